r"""Counts hangs of one SD-shaped batched solve with and without the flag.

XLA:CPU's concurrency-optimized scheduler intermittently deadlocked the
batched solver (every thread idle in a futex wait); ``import detune_jax``
turns it off unless ``XLA_FLAGS`` names it. This runs a solve like the one
that hung (one 640x768 layer, n=5, r=32, 10 steps, under vmap; a single
layer is now solved without vmap, so two such layers here) ``--runs`` times
in fresh processes with the scheduler on and off and prints the number of runs
that did not finish within ``--timeout`` seconds.

  python -m research.xla_deadlock_check --runs=10
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("runs", 10, "Fresh processes per setting.")
flags.DEFINE_integer("timeout", 40, "Seconds after which a run counts as hung.")

_CHILD = """
import jax, detune_jax as dj
from detune_jax.synthetic import lora_stack
W, Wp = lora_stack(0, 640, 768, n=5, rank=32, layers=2)
jax.block_until_ready(dj.spectral_detuning(Wp, 32, steps=10, refine=1))
"""


def main(argv: Sequence[str]) -> None:
  del argv
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for value in ("true", "false"):
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_enable_concurrency_"
               f"optimized_scheduler={value}", PYTHONPATH=root)
    hung = 0
    for _ in range(FLAGS.runs):
      try:
        subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=root,
                       capture_output=True, timeout=FLAGS.timeout, check=True)
      except subprocess.TimeoutExpired:
        hung += 1
    print(f"concurrency_optimized_scheduler={value}: {hung}/{FLAGS.runs} "
          f"runs hung (> {FLAGS.timeout} s)", flush=True)


if __name__ == "__main__":
  app.run(main)
