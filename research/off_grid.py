r"""Releases not rounded from a base on the grid: when ``auto`` skips the grid step.

The dtype-aware grid step (:func:`detune_jax.grid_refine`) models a
low-precision release as ``W'_i = round(W + M_i)`` with the base ``W`` itself
on the release dtype's grid: a base released in bf16, fine-tuned, merged and
saved in bf16. A publisher may also hold a float32 base, fine-tune it, and
round each merge to bf16 on its own (and the base too): then ``W'_i =
round(W32 + M_i)``, no base on the grid explains the releases, and the
step's output is worse than its input. This prints, per release model and
number of fine-tunes:

* ``consistent``: the grid step's share of entries whose grid value lies in
  the intersection of the rounding intervals
  (``GridDiagnostics.consistent_fraction``; smallest and largest over the
  layers), the figure ``auto`` compares with
  ``GridSettings().min_consistent`` to keep or skip the step per layer;
* the W-Error and bit-exact share of the estimate before the grid step
  (``auto`` with ``dtype_aware=False``), after it, and of ``auto`` itself.
  W-Errors are against the base the fine-tunes were made from (the grid
  base ``on_grid``, the float32 base ``off_grid``); bit-exact shares against
  the released (rounded) base.

  python -m research.off_grid --dim=96 --rank=4 --layers=2
  python -m research.off_grid --scenario=minilm --ns=3,5,8
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

import detune_jax as dj
from detune_jax import model_stacks
from detune_jax.solvers import grid
from detune_jax.solvers import registry
from detune_jax.synthetic import lora_stack, release

FLAGS = flags.FLAGS


def define_flags():
  """Flags of the binary (defined on run, so that imports never clash)."""
  flags.DEFINE_enum("scenario", "gaussian", ["gaussian", "minilm"],
                    "Synthetic Gaussian LoRAs or the real MiniLM fine-tunes.")
  flags.DEFINE_list("ns", ["3"], "Numbers of fine-tunes.")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16"],
                    "Release dtype.")
  flags.DEFINE_integer("dim", 96, "Synthetic layer size.")
  flags.DEFINE_integer("rank", 4, "LoRA rank (16 for minilm).")
  flags.DEFINE_integer("layers", 2, "Synthetic layers; minilm: the first this "
                       "many layers (0: all 24).")
  flags.DEFINE_string("minilm_dir", model_stacks.MINILM_DIR,
                    "A folder of base/ and fine-tunes ft*/ (default: the shipped MiniLM bench's rank-16 adapters, merged there on first use).")
  flags.DEFINE_string("json_out", None, "Write the rows to this JSON file.")


def float32_stacks(n: int):
  """``(W32 [L, d, k], W_primes32 [L, n, d, k])``: the float32 base and
  merges of the scenario."""
  if FLAGS.scenario == "minilm":
    W, Wp = model_stacks.folder_stack(FLAGS.minilm_dir, n)
    if FLAGS.layers:
      W, Wp = W[:FLAGS.layers], Wp[:FLAGS.layers]
    return W, Wp
  return lora_stack(0, FLAGS.dim, FLAGS.dim, n, FLAGS.rank,
                    layers=FLAGS.layers)


def releases(W32, Wp32, dtype: str):
  """``{model: (W_target float32, W_released, W_primes)}`` for the two
  release models: ``on_grid`` (the base rounded, then each merge of it
  rounded: :func:`detune_jax.synthetic.release`) and ``off_grid`` (each
  float32 merge, and the base, rounded on its own)."""
  out = {}
  for model, rebase in (("on_grid", True), ("off_grid", False)):
    W, Wp = release(W32, Wp32, dtype, rebase)
    out[model] = (W.astype(np.float32) if rebase else np.asarray(W32), W, Wp)
  return out


def measure(W_primes, rank: int, target, released):
  """One row's figures: the grid step's consistent fraction, and W-Error /
  bit-exact share before it, after it and of ``auto``."""
  Wp = jnp.asarray(W_primes)
  before, _ = registry.solve(Wp, rank, solver="auto", dtype_aware=False)
  after, gdiag = grid.grid_refine(
      Wp, before, rank, **grid.GridSettings().refine_options())
  auto, _ = registry.solve(Wp, rank, solver="auto")
  frac = np.asarray(gdiag.consistent_fraction)
  row = dict(consistent_min=float(frac.min()), consistent_max=float(frac.max()),
             kept_layers=int(np.sum(frac >= grid.GridSettings().min_consistent)),
             layers=int(frac.size))
  for name, W in (("before", before), ("after", after), ("auto", auto)):
    row[f"{name}_w_error"] = float(dj.w_error(jnp.asarray(W, jnp.float32),
                                              jnp.asarray(target)))
    row[f"{name}_bit_exact"] = float(dj.bit_exact_fraction(
        W, jnp.asarray(released)))
  return row


def main(argv: Sequence[str]) -> None:
  del argv
  rank = 16 if FLAGS.scenario == "minilm" else FLAGS.rank
  rows = []
  for n in (int(x) for x in FLAGS.ns):
    W32, Wp32 = float32_stacks(n)
    for model, (target, released, Wp) in releases(W32, Wp32,
                                                   FLAGS.dtype).items():
      r = dict(scenario=FLAGS.scenario, dtype=FLAGS.dtype, model=model, n=n,
               **measure(Wp, rank, target, released))
      rows.append(r)
      print(f"{FLAGS.scenario} {FLAGS.dtype} n={n} {model:8s} consistent "
            f"{r['consistent_min']:.3f}-{r['consistent_max']:.3f}  W-Error "
            f"before {r['before_w_error']:.2f} after {r['after_w_error']:.2f} "
            f"auto {r['auto_w_error']:.2f}  bit-exact before "
            f"{100 * r['before_bit_exact']:.1f}% after "
            f"{100 * r['after_bit_exact']:.1f}% auto "
            f"{100 * r['auto_bit_exact']:.1f}%  (grid step kept on "
            f"{r['kept_layers']}/{r['layers']} layers)", flush=True)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
