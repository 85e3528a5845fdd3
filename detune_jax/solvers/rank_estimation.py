"""LoRA rank estimation from pairwise differences of fine-tuned matrices.

``W'_i - W'_j = B_i A_i - B_j A_j`` has rank ``r_i + r_j`` (generically, while
that is below ``min(d, k)``), so the numerical rank ``s_ij`` of each pairwise
difference gives a linear system ``r_i + r_j = s_ij``; with ``n >= 3`` it
determines every ``r_i`` (least squares over the pairs, then an exact
consistency check). With ``n = 2`` only the sum is known and equal ranks are
assumed.

The numerical rank of one difference is where its singular values drop the
most (the largest ratio ``s_t / s_{t+1}``); the estimate is called ambiguous
when that drop is not clearly the largest one.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from detune_jax.solvers import lowrank


class RankEstimationError(ValueError):
  """The ranks cannot be told from the data; the message says why."""


class RankEstimate(NamedTuple):
  """Details of a rank estimate.

  Attributes:
    ranks: per-LoRA ranks (tuple of ints).
    pair_ranks: ``{(i, j): numerical rank of W'_i - W'_j}``.
    pair_gaps: ``{(i, j): log10 of the drop at that rank}``.
    ambiguous: True when the answer should not be trusted.
    reason: why it is ambiguous ('' otherwise).
  """
  ranks: tuple
  pair_ranks: dict
  pair_gaps: dict
  ambiguous: bool
  reason: str


# A drop must be at least this many decades, and this many times larger
# (in log) than the next-largest drop, to count as a rank.
MIN_GAP_DECADES = 1.0
GAP_DOMINANCE = 2.0


def numerical_rank(s) -> tuple[int, float, float]:
  """Rank at the largest drop of descending singular values ``s``.

  Returns:
    ``(rank, gap, runner_up)``: the rank, the log10 size of its drop, and of
    the next-largest drop. ``rank == len(s)`` when no drop is found and
    ``rank == 0`` for a zero matrix.
  """
  s = np.asarray(s, np.float64)
  if s.size == 0 or s[0] <= 0:
    return 0, math.inf, 0.0
  floor = s[0] * 1e-12
  logs = np.log10(np.maximum(s, floor))
  gaps = logs[:-1] - logs[1:]
  if gaps.size == 0:
    return len(s), 0.0, 0.0
  t = int(np.argmax(gaps))
  top = float(gaps[t])
  runner = float(np.max(np.delete(gaps, t))) if gaps.size > 1 else 0.0
  if s[-1] > floor and top < MIN_GAP_DECADES:
    return len(s), top, runner
  return t + 1, top, runner


def _pairs(n: int):
  if n <= 4:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]
  pairs = set()
  for i in range(n):
    for step in (1, 2):
      j = (i + step) % n
      pairs.add((min(i, j), max(i, j)))
  return sorted(pairs)


@functools.partial(jax.jit, static_argnames=("q",))
def _pair_singular_values(diffs, key, q: Optional[int]):
  if q is None:
    return jnp.linalg.svd(diffs, compute_uv=False)
  return jax.vmap(lambda a: lowrank.svd_randomized(a, q, key, niter=4)[1])(diffs)


def estimate_rank_details(W_primes, *, max_rank: int = 256,
                          seed: int = 0) -> RankEstimate:
  """Estimates per-LoRA ranks of one layer and says how sure it is.

  Args:
    W_primes: ``[n, d, k]`` fine-tuned versions of one layer.
    max_rank: largest per-LoRA rank considered; larger layers are sketched
      with ``2 * max_rank + 16`` columns instead of a full SVD.
    seed: seed of the sketch.
  """
  W = np.asarray(W_primes, np.float32)
  n, d, k = W.shape
  if n < 2:
    raise RankEstimationError(f"need at least 2 fine-tuned matrices, got {n}")
  m = min(d, k)
  pairs = _pairs(n)
  diffs = jnp.asarray(np.stack([W[i] - W[j] for i, j in pairs]))
  q = 2 * max_rank + 16
  sv = np.asarray(_pair_singular_values(diffs, jax.random.key(seed),
                                        None if q >= m else q))
  pair_ranks, pair_gaps, reasons = {}, {}, []
  for (i, j), s in zip(pairs, sv):
    r, gap, runner = numerical_rank(s)
    pair_ranks[(i, j)], pair_gaps[(i, j)] = r, gap
    if r == 0:
      reasons.append(f"models {i} and {j} are identical in this layer")
    elif r >= min(m, len(s)):
      reasons.append(f"W'_{i} - W'_{j} has no rank gap (full rank "
                     f"{len(s)}): ranks too large for the layer or not LoRA")
    elif gap < MIN_GAP_DECADES or gap < GAP_DOMINANCE * runner:
      reasons.append(f"W'_{i} - W'_{j}: weak rank gap at {r} "
                     f"({gap:.2f} vs {runner:.2f} decades)")
  if n == 2:
    total = pair_ranks[(0, 1)]
    if total % 2:
      reasons.append(f"with 2 models only the sum of ranks ({total}) is known "
                     "and it is odd; give --rank")
    ranks = (max(total // 2, 1),) * 2
  else:
    A = np.zeros((len(pairs), n))
    for row, (i, j) in enumerate(pairs):
      A[row, i] = A[row, j] = 1
    b = np.array([pair_ranks[p] for p in pairs], np.float64)
    sol = np.linalg.lstsq(A, b, rcond=None)[0]
    ranks = tuple(max(int(round(x)), 1) for x in sol)
    bad = [f"{p}: {pair_ranks[p]} != {ranks[p[0]]} + {ranks[p[1]]}"
           for p in pairs if pair_ranks[p] != ranks[p[0]] + ranks[p[1]]]
    if bad:
      reasons.append("pairwise ranks are inconsistent with per-LoRA ranks "
                     "(shared directions or noise): " + "; ".join(bad[:3]))
  return RankEstimate(ranks=ranks, pair_ranks=pair_ranks, pair_gaps=pair_gaps,
                      ambiguous=bool(reasons), reason="; ".join(reasons))


def estimate_rank(W_primes, *, max_rank: int = 256, seed: int = 0):
  """Estimates the LoRA rank(s) of one layer from its fine-tuned versions.

  Args:
    W_primes: ``[n, d, k]``.
    max_rank: largest per-LoRA rank considered.
    seed: seed of the sketch used for large layers.

  Returns:
    An int when all LoRAs share one rank, else a tuple of per-LoRA ints.

  Raises:
    RankEstimationError: when the estimate is ambiguous (the message says
      why); :func:`estimate_rank_details` returns the guess instead.

  >>> import jax, jax.numpy as jnp
  >>> ks = jax.random.split(jax.random.key(0), 3)
  >>> W = jax.random.normal(ks[0], (64, 64))
  >>> B = jax.random.normal(ks[1], (4, 64, 8))
  >>> A = jax.random.normal(ks[2], (4, 8, 64))
  >>> estimate_rank(W + B @ A)
  8
  """
  est = estimate_rank_details(W_primes, max_rank=max_rank, seed=seed)
  if est.ambiguous:
    raise RankEstimationError("cannot estimate the LoRA rank: " + est.reason)
  if len(set(est.ranks)) == 1:
    return est.ranks[0]
  return est.ranks
