r"""Why the grid step stops short of the data limit at low rank (bf16).

On synthetic bf16 releases with few update parameters per weight ``auto``
gets fewer weights bit-exactly than the true updates would determine (rank
4 of 96, n=3: 97.89% against 99.36%), and on some low-rank stacks the
search of :func:`detune_jax.explain_releases` does not explain its output
(docs/results.md, "Bit-exact share by layer size and rank" and "What the
releases determine"). This probe separates the estimator from the start.
For each layer it starts from

* ``auto``: the default's output;
* ``truth``: the true base;
* ``perturbed``: the true base with ``--perturb`` of its entries moved one
  grid step up or down at random (seeded): errors as many as ``auto``'s,
  but without their structure;

and runs from each (a) :func:`detune_jax.grid_refine` (one round) and (b) a
converged continuous fit: float64 L-BFGS (``optax.lbfgs``) over ``W``
(continuous, from the start, in units of its grid step) and the factors of
rank-``r`` updates ``M_i`` (from the truncated SVD of ``W'_i - W``),
minimizing the squared violations of the rounding intervals ``lo_i <= W +
M_i <= hi_i`` (in units of the median interval width), then the grid
W-step (:func:`detune_jax.solvers.grid.interval_estimate`) from its
``M_i``.

It also prints how ``auto``'s errors are laid out (the share of their
energy in the leading ``r`` singular values, the median ``|W|``, and the
share where the widest release interval spans 4 or more grid steps of
``W``, at the wrong entries and over all), and what an estimator unlike the
grid step gets from the closed form: heteroscedastic least squares (each
residual ``W'_i - W - M_i`` weighted by ``1 / w_i^2``, the inverse of its
rounding interval's squared width), and how many of ``auto``'s wrong
entries it gets wrong too. An evaluation tool: it needs the true base.
Results: docs/results.md, "Why low ranks are harder" (measured before the
grid step's re-reading and momentum).

  python -m research.lowrank_probe --dim=96 --rank=4 --layers=2
"""

from __future__ import annotations

import functools
import json
from typing import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import detune_jax as dj
from detune_jax.solvers import grid
from detune_jax.solvers import grid_diagnostics
from detune_jax.solvers import registry
from detune_jax.synthetic import lora_stack

FLAGS = flags.FLAGS
flags.DEFINE_integer("n", 3, "Number of fine-tunes.")
flags.DEFINE_integer("dim", 96, "Synthetic layer size.")
flags.DEFINE_integer("rank", 4, "LoRA rank.")
flags.DEFINE_integer("layers", 2, "Synthetic layers.")
flags.DEFINE_integer("fit_steps", 3000, "L-BFGS steps of the continuous "
                     "and the weighted fits.")
flags.DEFINE_float("perturb", 0.025, "Share of the true base's entries "
                   "moved one grid step for the 'perturbed' start.")
flags.DEFINE_string("json_out", None, "Write the rows here as JSON.")


def _lbfgs(f, params, steps: int):
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(f)

  def body(carry, _):
    p, state = carry
    value, g = value_and_grad(p, state=state)
    updates, state = opt.update(g, state, p, value=value, grad=g,
                                value_fn=f)
    return (optax.apply_updates(p, updates), state), value

  (params, _), values = jax.lax.scan(body, (params, opt.init(params)), None,
                                     length=steps)
  return params, values


def _factors(W_primes, W0, rank: int):
  """Factors ``(B [n, d, r], A [n, r, k])`` of the truncated SVDs of
  ``W'_i - W0`` (float64)."""
  U, S, Vt = jnp.linalg.svd(W_primes.astype(jnp.float64) - W0[None],
                            full_matrices=False)
  root = jnp.sqrt(S[:, :rank])
  return U[:, :, :rank] * root[:, None], Vt[:, :rank] * root[:, :, None]


@functools.partial(jax.jit, static_argnames=("rank", "steps"))
def _weighted_fit(W_primes, W0, *, rank: int, steps: int):
  """``W`` (release dtype) of the heteroscedastic least-squares fit from
  ``W0``: rounding noise has variance ``w_i^2 / 12`` for an interval of
  width ``w_i``, so each residual ``W'_i - W - M_i`` is weighted by
  ``1 / w_i^2`` (``W`` the weighted mean of the ``W'_i - M_i`` per entry;
  L-BFGS over the factors), then the grid W-step from its ``M_i``."""
  lo, hi = (x.astype(jnp.float64) for x in grid.rounding_interval(W_primes))
  unit = jnp.median(hi - lo)
  a = (unit / (hi - lo)) ** 2
  a_sum = jnp.sum(a, 0)
  Y = W_primes.astype(jnp.float64)
  B, A = _factors(W_primes, W0.astype(jnp.float64), rank)

  def objective(p):
    M = jnp.einsum("ndr,nrk->ndk", *p)
    W = jnp.sum(a * (Y - M), 0) / a_sum
    E = (Y - W[None] - M) / unit
    return jnp.sum(a * E * E)

  (B, A), _ = _lbfgs(objective, (B, A), steps)
  M = jnp.einsum("ndr,nrk->ndk", B, A).astype(jnp.float32)
  return grid.interval_estimate(W_primes, M)[0]


@functools.partial(jax.jit, static_argnames=("rank", "steps"))
def _continuous_fit(W_primes, W0, *, rank: int, steps: int):
  """``(W in the release dtype, final objective)`` of the converged
  continuous fit from ``W0`` (one layer, float64)."""
  lo, hi = (x.astype(jnp.float64) for x in grid.rounding_interval(W_primes))
  unit = jnp.median(hi - lo)
  # W moves in units of its own grid step (as L-BFGS starts from the
  # identity, the scale sets how far W moves against the M_i).
  step = (grid._next_toward(W0.astype(W_primes.dtype), up=True)
          .astype(jnp.float64) - W0.astype(jnp.float64))
  W0 = W0.astype(jnp.float64)
  B, A = _factors(W_primes, W0, rank)

  def objective(p):
    u, B, A = p
    X = (W0 + step * u)[None] + jnp.einsum("ndr,nrk->ndk", B, A)
    v = (jax.nn.relu(lo - X) + jax.nn.relu(X - hi)) / unit
    return jnp.sum(v * v)

  (_, B, A), values = _lbfgs(objective, (jnp.zeros_like(W0), B, A), steps)
  M = jnp.einsum("ndr,nrk->ndk", B, A).astype(jnp.float32)
  W, _ = grid.interval_estimate(W_primes, M)
  # In the release dtype: a cast to float32 inside the jit could be dropped
  # with the rounding (XLA:CPU allows excess precision).
  return W, values[-1]


def _perturbed(W_true, share: float, seed: int):
  """``W_true`` (low precision) with ``share`` of its entries moved one grid
  step, up or down at random."""
  rng = np.random.default_rng(seed)
  move = rng.random(W_true.shape) < share
  up = rng.random(W_true.shape) < 0.5
  W = jnp.asarray(W_true)
  moved = jnp.where(up, grid._next_toward(W, up=True),
                    grid._next_toward(W, up=False))
  return np.asarray(jnp.where(move, moved, W).astype(jnp.float32))


def _share(W, W_true) -> float:
  return float(dj.bit_exact_fraction(jnp.asarray(W), jnp.asarray(W_true)))


def main(argv: Sequence[str]) -> None:
  del argv
  args = (0, FLAGS.dim, FLAGS.dim, FLAGS.n, FLAGS.rank)
  W_true, Wp = lora_stack(*args, layers=FLAGS.layers, dtype="bfloat16")
  Wf, Wpf = (np.asarray(x) for x in lora_stack(*args, layers=FLAGS.layers))
  W_true = np.asarray(W_true)
  W_auto, _ = registry.solve(Wp, FLAGS.rank, solver="auto")
  W_auto = np.asarray(W_auto)
  W_cf, _ = registry.solve(Wp, FLAGS.rank, solver="closed_form",
                           dtype_aware=False)
  rows = []
  for layer in range(W_true.shape[0]):
    truth = W_true[layer]
    determined, _ = grid_diagnostics.determined_fraction(
        Wp[layer], np.asarray(Wpf[layer]) - np.asarray(Wf[layer])[None],
        truth)
    starts = {"auto": W_auto[layer],
              "truth": np.asarray(truth, np.float32),
              "perturbed": _perturbed(truth, FLAGS.perturb, layer)}
    for name, W0 in starts.items():
      refined, _ = dj.grid_refine(Wp[layer], W0, FLAGS.rank)
      with jax.enable_x64(True):
        fitted, objective = _continuous_fit(Wp[layer], jnp.asarray(W0),
                                            rank=FLAGS.rank,
                                            steps=FLAGS.fit_steps)
      fitted = np.asarray(jnp.asarray(fitted).astype(jnp.float32))
      rows.append(dict(layer=layer, start=name,
                       start_bit_exact=_share(W0, truth),
                       grid_refine=_share(refined, truth),
                       continuous_fit=_share(fitted, truth),
                       fit_objective=float(objective),
                       data_limit=determined))
      r = rows[-1]
      print(f"layer {layer} from {name:9s} ({100 * r['start_bit_exact']:5.1f}%"
            f" bit-exact): grid_refine {100 * r['grid_refine']:5.1f}%, "
            f"continuous fit {100 * r['continuous_fit']:5.1f}% (objective "
            f"{r['fit_objective']:.2g}); data limit "
            f"{100 * determined:5.1f}%", flush=True)
    with jax.enable_x64(True):
      weighted = _weighted_fit(Wp[layer], jnp.asarray(W_cf[layer]),
                               rank=FLAGS.rank, steps=FLAGS.fit_steps)
    weighted = np.asarray(jnp.asarray(weighted).astype(jnp.float32))
    wrong = ~np.asarray(grid.bit_exact_mask(W_auto[layer], truth))
    wrong_w = ~np.asarray(grid.bit_exact_mask(weighted, truth))
    error = W_auto[layer] - np.asarray(truth, np.float64)
    sv = np.linalg.svd(error, compute_uv=False)
    absw = np.abs(np.asarray(truth, np.float32))
    lo, hi = grid.rounding_interval(Wp[layer])
    step = np.asarray(grid._next_toward(jnp.asarray(truth), up=True)
                      .astype(jnp.float32)) - np.asarray(truth, np.float32)
    ratio = np.max(np.asarray(hi - lo), axis=0) / step
    rows.append(dict(layer=layer, start="auto_error",
                     wrong=int(wrong.sum()),
                     top_rank_energy=float(np.sum(sv[:FLAGS.rank] ** 2)
                                           / np.sum(sv ** 2)),
                     median_abs_w_wrong=float(np.median(absw[wrong])),
                     median_abs_w=float(np.median(absw)),
                     coarse_wrong=float(np.mean(ratio[wrong] >= 4)),
                     coarse=float(np.mean(ratio >= 4)),
                     weighted_fit=_share(weighted, truth),
                     wrong_in_both=int(np.sum(wrong & wrong_w)),
                     wrong_alike=int(np.sum(wrong & wrong_w
                                            & (weighted == W_auto[layer])))))
    r = rows[-1]
    print(f"layer {layer} auto's errors: {r['wrong']} entries, "
          f"{100 * r['top_rank_energy']:.0f}% of their energy in "
          f"{FLAGS.rank} singular values; median |W| "
          f"{r['median_abs_w_wrong']:.2g} at them, {r['median_abs_w']:.2g} "
          f"over all; a release interval 4 or more grid steps of W wide at "
          f"{100 * r['coarse_wrong']:.0f}% of them, "
          f"{100 * r['coarse']:.1f}% of all", flush=True)
    print(f"layer {layer} weighted least squares from the closed form: "
          f"{100 * r['weighted_fit']:5.1f}% bit-exact; wrong where auto is "
          f"wrong at {r['wrong_in_both']} of auto's {r['wrong']}, with the "
          f"same value at {r['wrong_alike']}", flush=True)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
