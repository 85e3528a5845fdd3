"""Spectral DeTuning (Horwitz et al. 2024, Alg. 1-2) in pure JAX.

Solves, for one layer, ``min_{W, M_i} sum_i ||W'_i - W - M_i||_F^2`` subject to
``rank(M_i) <= r_i`` by coordinate descent:

* init: ``W = mean_i W'_i`` (or a given ``init``);
* M-step: ``M_i = SVD_{r_i}(W'_i - W)`` at the scheduler's working rank;
* W-step: ``W = mean_i (W'_i - M_i)``;
* the rank scheduler (:mod:`detune_jax.solvers.schedule`) runs inside the
  ``lax.while_loop`` state.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from detune_jax.solvers import lowrank
from detune_jax.solvers.schedule import (RankSchedule, rank_schedule_init,
                                         rank_schedule_step)

Rank = Union[int, Sequence[int]]


class Diagnostics(NamedTuple):
  """What a solve did. With a layer axis every field gains a leading ``L``.

  Attributes:
    loss: ``[steps]`` float32 loss of Eq. 3 (mean squared residual, averaged
      over LoRAs) after each step; ``nan`` after an early stop.
    rank: ``[steps, n]`` int32 working rank of each LoRA at each step; ``0``
      after an early stop.
    steps: int32 number of steps taken.
    final_rank: ``[n]`` int32 working rank of the last step taken.
    final_loss: float32 loss after the last step taken.
  """
  loss: jnp.ndarray
  rank: jnp.ndarray
  steps: jnp.ndarray
  final_rank: jnp.ndarray
  final_loss: jnp.ndarray


def stack_sum(x):
  """Sum over the leading (stacked) axis as a chain of adds.

  XLA:CPU reduces over a small leading axis far slower than it adds the
  slices (DESIGN.md section 5), so the n-way reductions of the solver are
  written out.
  """
  return functools.reduce(jnp.add, [x[i] for i in range(x.shape[0])])


def stack_mean(x):
  """Mean over the leading axis, see :func:`stack_sum`."""
  return stack_sum(x) / x.shape[0]


def normalize_ranks(rank: Rank, n: int, d: int, k: int) -> tuple[int, ...]:
  """Validates ``rank`` (an int or ``n`` ints) against a ``[n, d, k]`` stack."""
  if isinstance(rank, (int, np.integer)):
    ranks = (int(rank),) * n
  else:
    ranks = tuple(int(r) for r in rank)
    if len(ranks) != n:
      raise ValueError(f"got {len(ranks)} ranks for {n} fine-tuned matrices")
  for r in ranks:
    if r < 1:
      raise ValueError(f"rank must be >= 1, got {r}")
    if r > min(d, k):
      raise ValueError(f"rank {r} is larger than the layer allows: "
                       f"min(d, k) = {min(d, k)} for shape [{d}, {k}]")
  return ranks


def _solve_layer(W_primes, key, init, *, ranks, steps, schedule, svd, tol,
                 niter, oversample):
  """Spectral DeTuning for one ``[n, d, k]`` float32 stack (traceable)."""
  n, d, k = W_primes.shape
  r_end = max(ranks)
  q = r_end if svd == "exact" else min(r_end + oversample, d, k)
  ranks_arr = jnp.asarray(ranks, jnp.int32)
  W_bar = stack_mean(W_primes)
  W0 = W_bar if init is None else init.astype(jnp.float32)

  def msvd(R, t, V):
    if svd == "subspace":
      return jax.vmap(lowrank.svd_subspace)(R, V)
    if svd == "randomized":
      kt = jax.random.fold_in(key, t)
      return jax.vmap(lambda a: lowrank.svd_randomized(a, q, kt, niter))(R)
    return jax.vmap(lambda a: lowrank.svd_exact(a, q))(R)

  if svd == "subspace":
    # Same sketch for every LoRA keeps the result independent of their order.
    V_init = jax.vmap(lambda a: lowrank.svd_randomized(a, q, key, niter)[2])(
        W_primes - W0[None])
  else:
    V_init = jnp.zeros((n, k, q), jnp.float32)

  def body(c):
    t, W, V, sched, loss_tr, rank_tr, prev_loss, _ = c
    cur = jnp.minimum(sched.rank, ranks_arr)                      # [n]
    U, S, V_new = msvd(W_primes - W[None], t, V)
    S = jnp.where(jnp.arange(q)[None, :] < cur[:, None], S, 0.0)
    M = jnp.einsum("ndq,nkq->ndk", U * S[:, None, :], V_new)
    W_new = W_bar - stack_mean(M)
    E = W_primes - W_new[None] - M
    loss = jnp.mean(jnp.mean(E * E, axis=(1, 2)))
    sched = rank_schedule_step(schedule, sched, loss, t + 1, r_end, steps)
    done = jnp.asarray(False)
    if tol is not None:
      at_end = jnp.all(cur == ranks_arr)
      done = at_end & (t > 0) & (prev_loss - loss <= tol * prev_loss)
    return (t + 1, W_new, V_new, sched, loss_tr.at[t].set(loss),
            rank_tr.at[t].set(cur), loss, done)

  def cond(c):
    return (c[0] < steps) & ~c[-1]

  init_c = (jnp.asarray(0, jnp.int32), W0, V_init,
            rank_schedule_init(schedule, r_end),
            jnp.full((steps,), jnp.nan, jnp.float32),
            jnp.zeros((steps, n), jnp.int32),
            jnp.asarray(jnp.inf, jnp.float32), jnp.asarray(False))
  t, W, _, _, loss_tr, rank_tr, loss, _ = jax.lax.while_loop(cond, body, init_c)
  last = jnp.maximum(t - 1, 0)
  return W, Diagnostics(loss=loss_tr, rank=rank_tr, steps=t,
                        final_rank=rank_tr[last], final_loss=loss)


@functools.partial(jax.jit, static_argnames=(
    "ranks", "steps", "schedule", "svd", "tol", "niter", "oversample"))
def _solve(W_primes, key, init, *, ranks, steps, schedule, svd, tol, niter,
           oversample):
  fn = functools.partial(_solve_layer, ranks=ranks, steps=steps,
                         schedule=schedule, svd=svd, tol=tol, niter=niter,
                         oversample=oversample)
  if W_primes.ndim == 4:
    return jax.vmap(fn, in_axes=(0, None, None if init is None else 0))(
        W_primes, key, init)
  return fn(W_primes, key, init)


def spectral_detuning(W_primes, rank: Rank, steps: int = 300, *,
                      schedule: RankSchedule = RankSchedule(),
                      svd: str = "subspace",
                      tol: Optional[float] = None,
                      seed: int = 0,
                      init=None,
                      niter: int = 2,
                      oversample: int = 0):
  """Recovers the pre-fine-tuning weights of one layer or a batch of layers.

  Args:
    W_primes: ``[n, d, k]`` stack of the n fine-tuned versions of one layer,
      or ``[L, n, d, k]`` for L same-shape layers (solved with ``jax.vmap``;
      identical to solving each layer alone). Any float dtype; computed in
      float32.
    rank: the LoRA rank, an int for all LoRAs or one int per LoRA (each LoRA
      then has its own end rank; the schedule caps the working rank of LoRA
      ``i`` at ``rank[i]``).
    steps: maximum number of optimisation steps (paper: 300 for ViT and SD,
      1000 for Mistral).
    schedule: :class:`RankSchedule` (default: paper Table 9; use
      ``RankSchedule(kind="fixed")`` for the ablation without scheduler).
    svd: truncated SVD of the M-step: ``"subspace"`` (default, warm-started
      subspace iteration), ``"randomized"`` (as ``torch.svd_lowrank``) or
      ``"exact"``.
    tol: optional relative tolerance: stop once every LoRA works at its end
      rank and one step lowers the loss by at most ``tol`` times its value.
    seed: seed of the random sketches.
    init: optional starting ``W`` (``[d, k]`` or ``[L, d, k]``) instead of the
      mean of the ``W'_i``, e.g. a closed-form estimate to refine.
    niter: power iterations of the randomized sketches.
    oversample: extra subspace columns for the randomized/subspace methods.

  Returns:
    ``(W, diagnostics)``: the float32 recovery (``[d, k]`` or ``[L, d, k]``)
    and :class:`Diagnostics`.

  >>> import jax, jax.numpy as jnp
  >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  >>> W = jax.random.normal(k1, (64, 48)) * 0.02
  >>> B = jax.random.normal(k2, (3, 64, 4)) * 0.02
  >>> A = jax.random.normal(k3, (3, 4, 48)) * 0.02
  >>> W_rec, diag = spectral_detuning(W + B @ A, rank=4, steps=200)
  >>> bool(jnp.log10(jnp.mean((W_rec - W) ** 2)) < -12)
  True
  """
  W_primes = jnp.asarray(W_primes)
  if W_primes.ndim not in (3, 4):
    raise ValueError("W_primes must be [n, d, k] or [L, n, d, k], got shape "
                     f"{tuple(W_primes.shape)}")
  if not jnp.issubdtype(W_primes.dtype, jnp.floating):
    raise ValueError(f"W_primes must be floating point, got {W_primes.dtype}")
  n, d, k = W_primes.shape[-3:]
  if n < 2:
    raise ValueError(f"need at least 2 fine-tuned matrices, got {n}")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if svd not in lowrank.SVD_METHODS:
    raise ValueError(f"unknown svd method {svd!r}; expected one of "
                     f"{lowrank.SVD_METHODS}")
  ranks = normalize_ranks(rank, n, d, k)
  if init is not None:
    init = jnp.asarray(init, jnp.float32)
    if init.shape != W_primes.shape[:-3] + (d, k):
      raise ValueError(f"init has shape {tuple(init.shape)}, expected "
                       f"{W_primes.shape[:-3] + (d, k)}")
  return _solve(W_primes.astype(jnp.float32), jax.random.key(seed), init,
                ranks=ranks, steps=int(steps), schedule=schedule, svd=svd,
                tol=None if tol is None else float(tol), niter=int(niter),
                oversample=int(oversample))
