r"""Benchmark: the closed-form solver against 300 steps of Spectral DeTuning.

Is one-shot recovery far faster than 300 iterations? This times, in one
process on the same seeded synthetic stacks (exact float32 low-rank updates
``W + B_i A_i``, ViT-sized layers), each layer solver of
:data:`detune_jax.solvers.registry.SOLVERS` that applies: one untimed call
compiles it, then ``--repeats`` timed calls (medians; compilation is
reported apart), with the W-Error of the result and the ratio of each
method's time to the closed form's.

With ``--dtype=bfloat16`` the fine-tunes are released in bf16 (the base on
the bf16 grid too), so every solver but ``mean_lora`` also runs the
dtype-aware grid step, as ``experiments.recover`` does, and the share of
weights recovered bit-exactly is printed, with the memory XLA plans for the
grid step's program (its arguments and temporaries, in ``[d, k]`` float32
arrays: what ``detune_jax.pipeline.layer_bytes`` budgets for such a layer).

  python -m experiments.bench_closed_form --repeats=3
  python -m experiments.bench_closed_form --dim=2048 --ns=3 --methods=auto \
      --dtype=bfloat16
"""

from __future__ import annotations

import json
import time
from typing import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import detune_jax as dj
from detune_jax import pipeline
from detune_jax.solvers import grid
from detune_jax.solvers import registry
from detune_jax.synthetic import lora_stack

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 3, "Timed calls per method (median).")
flags.DEFINE_list("ns", ["3", "5", "8"], "Numbers of fine-tunes.")
flags.DEFINE_integer("dim", 768, "Layer size (dim x dim).")
flags.DEFINE_integer("rank", 16, "LoRA rank.")
flags.DEFINE_integer("layers", 1, "Layers per call (vmapped).")
flags.DEFINE_integer("steps", 300, "Steps of the iterative solvers.")
flags.DEFINE_list("methods", ["closed_form", "closed_form+refine", "auto",
                              "spectral_detuning"], "Solvers to time.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Release "
                  "dtype of the fine-tunes.")
flags.DEFINE_string("json_out", None, "Write the rows to this JSON file.")


def _stack(n: int):
  pairs = [lora_stack(seed, FLAGS.dim, FLAGS.dim, n=n, rank=FLAGS.rank,
                      dtype=jnp.dtype(FLAGS.dtype))
           for seed in range(FLAGS.layers)]
  W = np.stack([np.asarray(p[0]) for p in pairs])
  Wp = np.stack([np.asarray(p[1]) for p in pairs])
  if FLAGS.layers == 1:
    return W[0], Wp[0]
  return W, Wp


def _call(method, Wp, steps):
  W, _ = registry.solve(Wp, FLAGS.rank, solver=method, steps=steps)
  return jax.block_until_ready(W)


def time_method(method: str, W, Wp) -> dict:
  Wp = jax.device_put(Wp)
  t0 = time.perf_counter()
  _call(method, Wp, FLAGS.steps)
  first = time.perf_counter() - t0
  runs = []
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    W_rec = _call(method, Wp, FLAGS.steps)
    runs.append(time.perf_counter() - t0)
  row = dict(method=method, seconds=float(np.median(runs)), runs=runs,
             compile_and_first_s=first,
             w_error=float(dj.w_error(W_rec, W)))
  if FLAGS.dtype != "float32":
    row["bit_exact"] = float(dj.bit_exact_fraction(W_rec, W))
  return row


def grid_memory(n: int) -> dict:
  """XLA's memory analysis of the default grid step on one ``[n, dim,
  dim]`` bf16 layer, in units of a ``[dim, dim]`` float32 array."""
  d = FLAGS.dim
  # grid_refine as the registry calls it, its other settings its defaults.
  step = jax.jit(lambda Wp, W0: grid.grid_refine(
      Wp, W0, FLAGS.rank, **grid.GridSettings().refine_options()))
  ma = step.lower(jax.ShapeDtypeStruct((n, d, d), jnp.bfloat16),
                  jax.ShapeDtypeStruct((d, d), jnp.float32)
                  ).compile().memory_analysis()
  unit = 4 * d * d
  return dict(arguments=ma.argument_size_in_bytes / unit,
              temporaries=ma.temp_size_in_bytes / unit,
              budgeted=pipeline.layer_bytes(d, d, n, grid=True) / unit)


def main(argv: Sequence[str]) -> None:
  del argv
  print(f"jax {jax.__version__}, {jax.devices()}; layers {FLAGS.layers} x "
        f"{FLAGS.dim}x{FLAGS.dim}, r={FLAGS.rank}, released in "
        f"{FLAGS.dtype}, {FLAGS.steps} steps for the iterative methods, "
        f"medians of {FLAGS.repeats}")
  rows = []
  for n in (int(x) for x in FLAGS.ns):
    W, Wp = _stack(n)
    res = [time_method(m, W, Wp) for m in FLAGS.methods]
    base = next((r["seconds"] for r in res if r["method"] == "closed_form"),
                None)
    print(f"\n== n={n}")
    for r in res:
      r["n"] = n
      r["vs_closed_form"] = r["seconds"] / base if base else None
      ratio = (f"{r['vs_closed_form']:6.1f}x the closed form"
               if base else "")
      if "bit_exact" in r:
        ratio += f"  bit-exact {100 * r['bit_exact']:.2f}%"
      print(f"  {r['method']:19s} {r['seconds']:8.3f} s (runs "
            f"{', '.join(f'{x:.3f}' for x in r['runs'])}; first call "
            f"{r['compile_and_first_s']:.1f} s)  W-Error {r['w_error']:7.2f}"
            f"  {ratio}")
    if FLAGS.dtype != "float32":
      mem = grid_memory(n)
      print(f"  grid step memory (XLA): arguments {mem['arguments']:.1f} + "
            f"temporaries {mem['temporaries']:.1f} [d, k] float32 arrays; "
            f"pipeline.layer_bytes budgets {mem['budgeted']:.1f}")
      for r in res:
        r["grid_memory"] = mem
    rows += res
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
