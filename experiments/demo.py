r"""Recovers all-MiniLM-L6-v2 from 5 of the shipped LoRA fine-tunes.

    python -m experiments.demo [--work_dir=DIR]

Merges the shipped adapters lora_00..lora_04 (detune_jax/data/minilm_bench/
rank16) into the base (float32), recovers
the base from them with the pipeline (solver auto), and prints W-Error and
SBERT distance of the fine-tunes, their mean and the recovery to the true
base. The merged fine-tunes and the recovered model go to --work_dir
(./detune_demo_minilm by default, kept: a rerun reuses them).
"""

import time

_START = time.time()

import sys  # pylint: disable=g-import-not-at-top,g-bad-import-order

from absl import app, flags

from detune_jax import timings
from detune_jax.io.errors import BadInputError, parse_flags
from detune_jax.lora import demo

_BENCH = flags.DEFINE_string(
    "bench_dir", None, "A built subset of the bench (default the shipped "
    "rank-16 adapters, detune_jax/data/minilm_bench/rank16).")
_WORK_DIR = flags.DEFINE_string("work_dir", "detune_demo_minilm", "Where the "
                                "merged models and the recovery go (kept).")
_N = flags.DEFINE_integer("n", 5, "Fine-tunes to recover from.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  timings.enable_compilation_cache(None)
  work_dir = _WORK_DIR.value
  try:
    result = demo.recover_minilm(_BENCH.value, work_dir, _N.value)
  except BadInputError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  print(demo.format_table(result.rows))
  print(f"(distance of each to the true all-MiniLM-L6-v2, lower is closer: "
        f"W-Error is log10 of the weights' mean squared error over the "
        f"{result.report['n_solved']} fine-tuned matrices, SBERT the mean "
        f"log10 of 1 - cos between sentence embeddings; LoRA-FT: the mean "
        f"over the {_N.value} fine-tunes, Mean-LoRA: their average)")
  print(f"models in {work_dir}/; total time {time.time() - _START:.1f}s")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
