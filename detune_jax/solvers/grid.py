"""Dtype-aware recovery for fine-tunes released in a low-precision dtype.

Most checkpoints ship in bfloat16 or float16. Then every released weight is
``W'_i = round(W + M_i)`` and rounding noise, not the solver, limits the
W-Error. But the base ``W`` was released in the same dtype, so it lies on that
dtype's grid, and each released entry says more than its value: the exact sum
``W + M_i`` lies in the *rounding interval* of ``W'_i`` (the reals that round
to it). Given estimates of the ``M_i``,

    max_i (lo(W'_i) - M_i)  <=  W  <=  min_i (hi(W'_i) - M_i),

an interval of width below one grid step that (for accurate ``M_i``) holds
exactly one grid point: the base entry, bit-exact. :func:`interval_estimate`
takes the grid point nearest the centre of that intersection (the Chebyshev
centre, also when noise in the ``M_i`` makes it empty), and
:func:`grid_refine` alternates it with the M-step ``M_i = SVD_{r_i}(W'_i - W)``
so that a better ``W`` gives better ``M_i`` and back.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from detune_jax.solvers import lowrank
from detune_jax.solvers.spectral_detuning import (Rank, normalize_ranks,
                                                  stack_mean)

LOW_PRECISION_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Defaults of grid_refine's annealing and narrowed box (docs/results.md,
# "Bit-exact weights of bf16 releases").
SNAP_FROM = 0.2
SHRINK = 0.04
# Projections of the consistency check that decides whether a re-read base is
# kept (grid_refine's ``check_steps``).
CHECK_STEPS = 100
# Heavy-ball extrapolation of the grid step's projections onto rank r_i
# (grid_refine's ``momentum``; docs/results.md, "Momentum in the grid step's
# projections").
MOMENTUM = 0.9
# Projections of the updates alone before the grid step's alternation
# (grid_refine's ``free_steps``).
FREE_STEPS = 100
# explain_releases' projections: heavy-ball momentum, no over-relaxation:
# they find witnesses several times sooner than over-relaxed ones (relax
# 1.9, no momentum; docs/results.md, "Momentum in the grid step's
# projections").
EXPLAIN_RELAX = 1.0
EXPLAIN_MOMENTUM = 0.9
_UINT = {2: jnp.uint16, 4: jnp.uint32}


class GridDiagnostics(NamedTuple):
  """What :func:`grid_refine` did (a layer axis adds a leading ``L``).

  Attributes:
    steps: int32 alternations run.
    changed: int32 entries of ``W`` changed by the last alternation.
    consistent_fraction: float32 fraction of entries whose grid value lies in
      every input's rounding interval given the final ``M_i``: an estimate,
      needing no ground truth, of the fraction recovered bit-exactly.
    loss: float32 loss of Eq. 3 for the final ``W`` and ``M_i``.
    redecoded: bool, the re-read base was kept (``redecode_steps``).
  """
  steps: jnp.ndarray
  changed: jnp.ndarray
  consistent_fraction: jnp.ndarray
  loss: jnp.ndarray
  redecoded: jnp.ndarray


def low_precision_dtype(x) -> Optional[np.dtype]:
  """The dtype of ``x`` if it is bfloat16 or float16, else ``None``."""
  dt = jnp.dtype(getattr(x, "dtype", jnp.float32))
  return dt if dt in LOW_PRECISION_DTYPES else None


def round_to_grid(W, dtype):
  """Rounds ``W`` to the grid of ``dtype`` (round to nearest even).

  Args:
    W: any float array.
    dtype: e.g. ``jnp.bfloat16``.

  Returns:
    ``W`` cast to ``dtype``.

  >>> import jax.numpy as jnp
  >>> float(round_to_grid(jnp.float32(1.0 + 2 ** -10), jnp.bfloat16))
  1.0
  """
  return jnp.asarray(W, jnp.float32).astype(dtype)


def _next_toward(x, up: bool):
  """Neighbouring grid value of ``x`` (its own dtype) toward +inf or -inf."""
  bits = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize])
  nbits = 8 * x.dtype.itemsize
  sign = (bits >> (nbits - 1)) & 1
  mag = bits & ((1 << (nbits - 1)) - 1)
  grow = (sign == 0) if up else (sign == 1)
  # Away from zero: magnitude + 1; toward zero: magnitude - 1; from a zero of
  # the other sign: the smallest subnormal on the wanted side.
  new_mag = jnp.where(grow, mag + 1, jnp.where(mag == 0, 1, mag - 1))
  new_sign = jnp.where((mag == 0) & ~grow, 1 - sign, sign)
  out = (new_sign.astype(bits.dtype) << (nbits - 1)) | new_mag.astype(bits.dtype)
  return jax.lax.bitcast_convert_type(out, x.dtype)


def rounding_interval(x):
  """The reals that round to ``x`` in its (low-precision) dtype.

  Args:
    x: array of bfloat16 or float16 values (finite).

  Returns:
    ``(lo, hi)`` float32 arrays: the midpoints to the neighbouring grid values
    (exact in float32), so that ``round(y) == x`` for ``lo < y < hi``.

  >>> import jax.numpy as jnp
  >>> lo, hi = rounding_interval(jnp.asarray([1.0], jnp.bfloat16))
  >>> float(lo[0]), float(hi[0])
  (0.998046875, 1.00390625)
  """
  x = jnp.asarray(x)
  if jnp.dtype(x.dtype) not in LOW_PRECISION_DTYPES:
    raise ValueError(f"rounding intervals need bfloat16 or float16, got "
                     f"{x.dtype}")
  xf = x.astype(jnp.float32)
  lo = 0.5 * (xf + _next_toward(x, up=False).astype(jnp.float32))
  hi = 0.5 * (xf + _next_toward(x, up=True).astype(jnp.float32))
  return lo, hi


def interval_estimate(W_primes, M, *, estimator: str = "midrange"):
  """Grid estimate of ``W`` that respects every input's rounding interval.

  Args:
    W_primes: ``[..., n, d, k]`` low-precision (bfloat16/float16) inputs.
    M: ``[..., n, d, k]`` estimates of the low-rank updates.
    estimator: ``"midrange"`` (centre of the intersection of the intervals
      ``[lo_i - M_i, hi_i - M_i]``) or ``"mean"`` (mean of ``W'_i - M_i``).

  Returns:
    ``(W, consistent)``: ``W`` in the inputs' dtype, and a bool mask of the
    entries whose grid value lies in all intervals.
  """
  W_primes = jnp.asarray(W_primes)
  return _estimate(W_primes, *rounding_interval(W_primes),
                   jnp.asarray(M, jnp.float32), estimator)[:2]


def _intersection(lo, hi, M):
  """``(lower, upper)``: the intersection over the stacked axis (-3) of the
  intervals ``[lo_i - M_i, hi_i - M_i]`` that hold ``W`` given ``M``."""
  # A loop over the stacked axis, one slice at a time: XLA:CPU reduces over
  # an outer axis several times slower, and this runs in every step of the
  # grid step's loops (docs/results.md, "The grid step on large layers").
  # Unrolled, it was as fast but held more temporary memory for n = 8.
  def over_stack(op, bound):
    axis = M.ndim - 3
    part = lambda i: (jax.lax.dynamic_index_in_dim(bound, i, axis, False)
                      - jax.lax.dynamic_index_in_dim(M, i, axis, False))
    return jax.lax.fori_loop(1, M.shape[-3], lambda i, acc: op(acc, part(i)),
                             part(0))
  return over_stack(jnp.maximum, lo), over_stack(jnp.minimum, hi)


def _estimate(W_primes, lo, hi, M, estimator):
  """:func:`interval_estimate` given the inputs' rounding intervals; also
  returns the float32 centre that ``W`` rounds."""
  lower, upper = _intersection(lo, hi, M)
  if estimator == "midrange":
    centre = 0.5 * (lower + upper)
  elif estimator == "mean":
    centre = stack_mean(jnp.moveaxis(W_primes.astype(jnp.float32) - M, -3, 0))
  else:
    raise ValueError(f"unknown estimator {estimator!r}")
  W = round_to_grid(centre, W_primes.dtype)
  Wf = W.astype(jnp.float32)
  return W, (Wf >= lower) & (Wf <= upper), centre


def _truncation(ranks, q: int):
  """``truncate(U, S, V)``: the updates ``U_i diag(S_i) V_i^T`` of ``q``
  leading triplets, keeping LoRA ``i``'s first ``ranks[i]`` of them."""
  keep = jnp.arange(q)[None, :] < jnp.asarray(ranks)[:, None]         # [n, q]

  def truncate(U, S, V):
    return jnp.einsum("ndq,nkq->ndk", U * jnp.where(keep, S, 0.0)[:, None], V)

  return truncate


def _narrowed(lo, hi, fraction):
  """The intervals ``[lo, hi]`` less ``fraction`` of their width at both
  ends."""
  margin = fraction * (hi - lo)
  return lo + margin, hi - margin


def _heavy_ball(body, beta: float):
  """A ``fori_loop`` body over ``(carry, M_prev)`` that runs ``body`` with
  the carry's first item (the ``M_i``) extrapolated as ``M + beta (M -
  M_prev)``: heavy-ball momentum of a loop of projections."""
  def step(s, c):
    c, prev = c
    M = c[0]
    return body(s, (M + beta * (M - prev),) + tuple(c[1:])), M

  return step


def _extrapolated(steps, body, carry, beta: float):
  """``fori_loop(0, steps, body, carry)`` with :func:`_heavy_ball` momentum
  ``beta``, started afresh (``beta`` 0: the plain loop)."""
  if not beta:
    return jax.lax.fori_loop(0, steps, body, carry)
  return jax.lax.fori_loop(0, steps, _heavy_ball(body, beta),
                           (carry, carry[0]))[0]


def _refine_layer(W_primes, W0, key, *, ranks, steps, estimator, oversample,
                  free_steps, restarts, snap_from, shrink, redecode_steps,
                  check_steps, momentum):
  n, d, k = W_primes.shape
  q = min(max(ranks) + oversample, d, k)
  truncate = _truncation(ranks, q)
  Wf = W_primes.astype(jnp.float32)
  lo, hi = rounding_interval(W_primes)
  # The alternation's box, narrowed by `shrink` of each interval's width at
  # both ends.
  lo_in, hi_in = _narrowed(lo, hi, shrink)

  def free(_, c):
    # Projection onto the updates consistent with *some* real W per entry
    # (the intervals [lo_i - M_i, hi_i - M_i] share a point), then onto rank
    # r_i. No grid W is involved: entries of W0 that are wrong do not pull
    # the M_i toward them. M_i is clipped only where the intervals disagree,
    # toward the centre of their hull.
    M, V = c
    w = 0.5 * sum(_intersection(lo, hi, M))
    Z = jnp.clip(M, lo - w[None], hi - w[None])
    U, S, V = jax.vmap(lowrank.svd_subspace)(Z, V)
    return truncate(U, S, V), V

  def body(s, c, box):
    # W is carried in the low-precision dtype so that it stays on the grid;
    # centre is what the W-step rounded to get it.
    M, W, centre, V, _ = c
    lo_box, hi_box = box
    # Project onto the box of updates consistent with the rounding intervals
    # (given W), then back onto rank r_i: alternating projections. The box is
    # centred on the grid W only where the centre of the intersection lies
    # within tau grid steps of it (tau grows from snap_from to 1/2 over the
    # alternation), elsewhere on that centre itself: entries whose rounding is
    # still in doubt do not pull the M_i toward a grid value that may be
    # wrong, and by the last step every entry is snapped.
    Wc = W.astype(jnp.float32)
    if snap_from < 0.5:
      tau = snap_from + (0.5 - snap_from) * s / steps
      step = _next_toward(W, up=True).astype(jnp.float32) - Wc
      Wc = jnp.where(jnp.abs(centre - Wc) <= tau * step, Wc, centre)
    Z = jnp.clip(M, lo_box - Wc[None], hi_box - Wc[None])
    U, S, V = jax.vmap(lowrank.svd_subspace)(Z, V)
    M = truncate(U, S, V)
    W_new, _, centre = _estimate(W_primes, lo, hi, M, estimator)
    return M, W_new, centre, V, jnp.sum(W_new != W).astype(jnp.int32)

  def start(W0):
    """M_i from the truncated SVD of W'_i - W0 (and its right vectors)."""
    U, S, V = jax.vmap(lambda a: lowrank.svd_randomized(a, q, key, 2))(
        Wf - W0[None])
    return truncate(U, S, V), V

  def one_round(W0, box=(lo_in, hi_in)):
    """M_i from the truncated SVD of W'_i - W0, the free projections, then
    the alternation (its M-step's box: ``box``)."""
    M, V = start(W0)
    if free_steps:
      M, V = _extrapolated(free_steps, free, (M, V), momentum)
    W, _, centre = _estimate(W_primes, lo, hi, M, estimator)
    M, W, _, V, changed = _extrapolated(
        steps, functools.partial(body, box=box),
        (M, W, centre, V, jnp.asarray(0, jnp.int32)), momentum)
    return W.astype(jnp.float32), M, changed

  def reproduced(W):
    """Share of the released values that rank-r_i updates reproduce with
    ``W`` after ``check_steps`` projections onto the box ``lo_i - W <= M_i
    <= hi_i - W`` and back onto rank r_i (float32; from the truncated SVD
    of W'_i - W): how consistent the releases are with ``W``."""
    def project(_, c):
      M, V = c
      U, S, V = jax.vmap(lowrank.svd_subspace)(
          jnp.clip(M, lo - W[None], hi - W[None]), V)
      return truncate(U, S, V), V
    M, _ = jax.lax.fori_loop(0, check_steps, project, start(W))
    X = W[None] + M
    return jnp.mean((X >= lo) & (X <= hi))

  def redecode(W, M_old):
    """Re-reads the entries where the alternation with the full box (no
    shrink) ends elsewhere than ``W``: the M_i are fitted to the other
    entries, those entries held only to intervals that share a point (as in
    the free projections), and the entries are then read off the
    intersection of the intervals. Returns ``(W', M', kept)``: the re-read
    base and its updates where the releases are more consistent with it
    than with ``W`` (else ``W`` and ``M_old``)."""
    # Each LAPACK-running part after the one before it (lowrank.after).
    W_full, _, _ = one_round(lowrank.after(W0, W), (lo, hi))
    doubt = W_full != W

    def project(_, c):
      M, V = c
      w = jnp.where(doubt, 0.5 * sum(_intersection(lo, hi, M)), W)
      U, S, V = jax.vmap(lowrank.svd_subspace)(
          jnp.clip(M, lo - w[None], hi - w[None]), V)
      return truncate(U, S, V), V

    M, _ = _extrapolated(redecode_steps, project,
                         start(lowrank.after(W, W_full)), momentum)
    W_new, _, _ = _estimate(W_primes, lo, hi, M, "midrange")
    W_new = jnp.where(doubt, W_new.astype(jnp.float32), W)
    consistent_new = reproduced(W_new)
    kept = consistent_new > reproduced(lowrank.after(W, consistent_new))
    return jnp.where(kept, W_new, W), jnp.where(kept, M, M_old), kept

  W, M, changed = one_round(W0)
  if restarts:
    W, M, changed = jax.lax.fori_loop(
        0, restarts, lambda _, c: one_round(c[0]), (W, M, changed))
  redecoded = jnp.asarray(False)
  if redecode_steps:
    W, M, redecoded = redecode(W, M)
  lower, upper = _intersection(lo, hi, M)
  consistent = (lower <= W) & (W <= upper)
  E = Wf - W[None] - M
  loss = jnp.mean(jnp.mean(E * E, axis=(1, 2)))
  return W, GridDiagnostics(steps=jnp.asarray(steps * (restarts + 1),
                                              jnp.int32),
                            changed=changed,
                            consistent_fraction=jnp.mean(consistent),
                            loss=loss, redecoded=redecoded)


@functools.partial(jax.jit, static_argnames=("ranks", "steps", "estimator",
                                             "oversample", "free_steps",
                                             "restarts", "snap_from",
                                             "shrink", "redecode_steps",
                                             "check_steps", "momentum"))
def _refine(W_primes, W0, key, *, ranks, steps, estimator, oversample,
            free_steps, restarts, snap_from, shrink, redecode_steps,
            check_steps, momentum):
  fn = functools.partial(_refine_layer, ranks=ranks, steps=steps,
                         estimator=estimator, oversample=oversample,
                         free_steps=free_steps, restarts=restarts,
                         snap_from=snap_from, shrink=shrink,
                         redecode_steps=redecode_steps,
                         check_steps=check_steps, momentum=momentum)
  if W_primes.ndim == 4:
    # lax.map (a scan over layers), not jax.vmap: the vmapped program hung
    # XLA:CPU on 24 MiniLM-sized layers (batched LAPACK calls side by side,
    # see lowrank.after).
    return jax.lax.map(lambda a: fn(a[0], a[1], key), (W_primes, W0))
  return fn(W_primes, W0, key)


def _checked_releases(W_primes, rank: Rank, caller: str):
  """``(W_primes, ranks)`` of a low-precision ``[n, d, k]`` or ``[L, n, d,
  k]`` stack, or a ValueError naming ``caller``."""
  W_primes = jnp.asarray(W_primes)
  if low_precision_dtype(W_primes) is None:
    raise ValueError(f"{caller} needs bfloat16 or float16 inputs, got "
                     f"{W_primes.dtype}")
  if W_primes.ndim not in (3, 4):
    raise ValueError("W_primes must be [n, d, k] or [L, n, d, k], got shape "
                     f"{tuple(W_primes.shape)}")
  return W_primes, normalize_ranks(rank, *W_primes.shape[-3:])


def grid_refine(W_primes, W0, rank: Rank, *, steps: int = 100,
                estimator: str = "midrange", seed: int = 0,
                oversample: int = 0, free_steps: int = FREE_STEPS,
                restarts: int = 0, snap_from: float = SNAP_FROM,
                shrink: float = SHRINK, redecode_steps: int = 0,
                check_steps: int = CHECK_STEPS, momentum: float = MOMENTUM):
  """Refines an estimate of ``W`` on the grid of low-precision inputs.

  Starts from ``M_i = SVD_{r_i}(W'_i - W0)`` and first takes ``free_steps``
  projections of the ``M_i`` alone onto the updates whose rounding
  intervals ``[lo_i - M_i, hi_i - M_i]`` share a point, and back onto rank
  ``r_i``: constraints on the differences ``M_i - M_j`` that need no
  estimate of ``W``, so that entries where ``W0`` is wrong do not pull the
  ``M_i`` toward it (measured on real MiniLM fine-tunes released in bf16,
  n=3, before the alternation was annealed: 94.2% of the weights bit-exact
  against 92.9% without, see docs/results.md). Then it alternates ``steps``
  times: the M-step projects each ``M_i`` onto the box of updates
  consistent with the rounding intervals of ``W'_i`` given ``W`` (``lo_i -
  W <= M_i <= hi_i - W``, narrowed by ``shrink``) and back onto rank
  ``r_i`` (one warm-started subspace-iteration SVD): alternating
  projections, which find a low-rank update consistent with every rounded
  entry and so beat the plain truncated SVD, whose error is the noise
  projected on the subspaces; the W-step is
  :func:`interval_estimate`. The M-step's box is centred on the grid ``W``
  only at entries whose intersection centre lies within ``tau`` grid steps
  of it, ``tau`` growing from ``snap_from`` to 1/2 over the alternation, and
  on the (continuous) centre elsewhere: annealing from the free projection
  to the grid, so that entries whose rounding is in doubt do not lock the
  ``M_i`` onto a wrong grid value before the ``M_i`` are good enough to
  decide them (real MiniLM fine-tunes in bf16, n=3: 94.9% of the weights
  bit-exact with every entry snapped from the start, 96.0% annealed; see
  docs/results.md).

  Args:
    W_primes: ``[n, d, k]`` or ``[L, n, d, k]`` bfloat16/float16 inputs (the
      released fine-tunes, not upcast).
    W0: float estimate of ``W`` (``[d, k]`` or ``[L, d, k]``), e.g. from
      :func:`subspace_intersection_detuning` or ``spectral_detuning``.
    rank: LoRA rank, an int or one per LoRA.
    steps: maximum alternations.
    estimator: see :func:`interval_estimate`.
    seed: seed of the initial sketch.
    oversample: extra subspace columns of the M-step.
    free_steps: projections of the ``M_i`` before the alternation (0: none).
    restarts: rounds run again from the previous round's ``W`` (the
      truncated SVD of ``W'_i - W``, the free projections, the alternation);
      each costs as much as the first. A better ``W`` gives better starting
      ``M_i``, so the rounds gain where the first round's ``W`` was wrong
      (docs/results.md, "Bit-exact weights of bf16 releases").
    snap_from: the first alternation's ``tau``, in ``[0, 1/2]``; 1/2 snaps
      every entry from the start (the plain alternation).
    shrink: the fraction of each rounding interval's width taken off both
      ends of the M-step's box (``lo_i - W + m_i <= M_i <= hi_i - W - m_i``
      with ``m_i = shrink (hi_i - lo_i)``), in ``[0, 1/2)``. Projections
      onto a box end on its faces; a slightly narrower box keeps the
      ``M_i`` inside the true one, so that a grid value one step off is not
      matched as easily (real MiniLM fine-tunes in bf16, n=3: 96.0% of the
      weights bit-exact with 0, 96.6% with 0.04; docs/results.md). The
      consistency diagnostics use the full intervals.
    redecode_steps: 0, or re-read the entries in doubt after the rounds:
      the alternation is run once more with the full box (``shrink`` 0),
      and the entries where it ends elsewhere are read again. The ``M_i``
      are fitted to the other entries by ``redecode_steps`` projections,
      those entries held only to intervals that share a point (as in the
      free projections), and the entries are then read off the intersection
      of the intervals. The re-read base is kept where the releases are
      more consistent with it (a larger share of their values reproduced by
      rank-``r_i`` updates after ``check_steps`` projections, float32).
      It gains where updates have few parameters per weight (low rank on a
      large layer: bf16, n=3, 1024x1024 r=8 98.7% -> 99.0% bit-exact) and
      keeps the base where they do not (docs/results.md, "Re-reading the
      entries in doubt"). With ``shrink`` 0 both runs are alike and
      little is in doubt.
    check_steps: projections of that consistency check.
    momentum: heavy-ball extrapolation of the projections onto rank
      ``r_i`` (the free ones, the alternation's M-steps and the
      re-reading's fit), in ``[0, 1)``: each projects ``M + momentum (M -
      M_prev)``, not ``M``. Alternating projections between the box and
      the rank-``r_i`` matrices creep along the narrow region where both
      nearly hold; the extrapolation gets them further, for one more pass
      over the stack per projection (up to 1.2x the time).
      With the re-reading it gains most (bf16, n=3, bit-exact: 64x64 r=2
      98.1% -> 98.8%, 256x256 r=16 95.2% -> 96.3%, real MiniLM fine-tunes
      96.6% -> 97.4%; docs/results.md, "Momentum in the grid step's
      projections"). The consistency check is not extrapolated.

  Returns:
    ``(W, GridDiagnostics)``: float32 ``W`` on the inputs' grid.

  >>> import jax, jax.numpy as jnp
  >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  >>> W = (jax.random.normal(k1, (64, 48)) * 0.02).astype(jnp.bfloat16)
  >>> B = jax.random.normal(k2, (3, 64, 4)) * 0.1
  >>> A = jax.random.normal(k3, (3, 4, 48)) * 0.1
  >>> W_primes = (W.astype(jnp.float32) + B @ A).astype(jnp.bfloat16)
  >>> W_rec, diag = grid_refine(W_primes, W_primes.astype(jnp.float32).mean(0), 4)
  >>> W_rec.dtype == jnp.float32
  True
  """
  W_primes, ranks = _checked_releases(W_primes, rank, "grid_refine")
  d, k = W_primes.shape[-2:]
  if int(restarts) < 0:
    raise ValueError(f"restarts must be >= 0, got {restarts}")
  if not 0.0 <= float(snap_from) <= 0.5:
    raise ValueError(f"snap_from must be in [0, 0.5], got {snap_from}")
  if not 0.0 <= float(shrink) < 0.5:
    raise ValueError(f"shrink must be in [0, 0.5), got {shrink}")
  if not 0.0 <= float(momentum) < 1.0:
    raise ValueError(f"momentum must be in [0, 1), got {momentum}")
  if int(redecode_steps) < 0 or int(check_steps) < 1:
    raise ValueError(f"redecode_steps must be >= 0 and check_steps >= 1, got "
                     f"{redecode_steps} and {check_steps}")
  W0 = jnp.asarray(W0, jnp.float32)
  if W0.shape != W_primes.shape[:-3] + (d, k):
    raise ValueError(f"W0 has shape {tuple(W0.shape)}, expected "
                     f"{W_primes.shape[:-3] + (d, k)}")
  return _refine(W_primes, W0, jax.random.key(seed), ranks=ranks,
                 steps=int(steps), estimator=estimator,
                 oversample=int(oversample), free_steps=int(free_steps),
                 restarts=int(restarts), snap_from=float(snap_from),
                 shrink=float(shrink), redecode_steps=int(redecode_steps),
                 check_steps=int(check_steps), momentum=float(momentum))


class Explanation(NamedTuple):
  """What :func:`explain_releases` found (a layer axis adds a leading ``L``).

  Attributes:
    explained: bool, every released value reproduced: ``W`` explains the
      releases exactly.
    reproduced: float64 fraction of the released values reproduced.
    steps: int32 projections taken.
    updates: float64 ``[..., n, d, k]`` numpy array, the rank-``r_i``
      updates found (the witness when ``explained``).
  """
  explained: np.ndarray
  reproduced: np.ndarray
  steps: np.ndarray
  updates: np.ndarray


def _explain_layer(W_primes, lo, hi, W, key, start=None, *, ranks, max_steps,
                   check_every, margin, relax, momentum):
  n, d, k = W_primes.shape
  q = max(ranks)
  truncate = _truncation(ranks, q)
  box_lo, box_hi = (x - W[None] for x in _narrowed(lo, hi, margin))
  nbits = _UINT[W_primes.dtype.itemsize]
  released = jax.lax.bitcast_convert_type(W_primes, nbits)

  def project(_, c):
    M, V = c
    Z = M + relax * (jnp.clip(M, box_lo, box_hi) - M)
    U, S, V = jax.vmap(lowrank.svd_subspace)(Z, V)
    return truncate(U, S, V), V

  # A released zero says |W + M_i| is below half the dtype's smallest
  # subnormal (4.6e-41 in bfloat16), which no float64 witness of weights
  # of ordinary size can hit: it counts as reproduced where |W + M_i| is
  # within float64 precision of the layer's scale, whatever its sign.
  zero = (released & ((1 << (8 * W_primes.dtype.itemsize - 1)) - 1)) == 0
  zero_tol = 1e-12 * jnp.max(jnp.abs(W_primes.astype(W.dtype)))

  def count(M):
    # Released as a checkpoint would be: rounded to float32, then to the
    # release dtype; compared bit for bit (a comparison of the rounded
    # values could be done by XLA at a higher precision).
    S = W[None] + M
    out = S.astype(jnp.float32).astype(W_primes.dtype)
    same = jax.lax.bitcast_convert_type(out, nbits) == released
    return jnp.sum(jnp.where(zero, jnp.abs(S) <= zero_tol, same))

  def body(c):
    # The momentum carries on across checks (M_prev in the loop's state).
    steps, M, V, prev, _ = c
    (M, V), prev = jax.lax.fori_loop(0, check_every,
                                     _heavy_ball(project, momentum),
                                     ((M, V), prev))
    return steps + check_every, M, V, prev, count(M)

  total = n * d * k
  # From the truncated SVD of W'_i - W, or of the given start.
  U, S, V = jax.vmap(lambda a: lowrank.svd_randomized(a, q, key, 2))(
      W_primes.astype(W.dtype) - W[None] if start is None else start)
  M = truncate(U, S, V)
  steps, M, _, _, same = jax.lax.while_loop(
      lambda c: (c[0] < max_steps) & (c[4] < total), body,
      (jnp.asarray(0, jnp.int32), M, V, M, count(M)))
  return same == total, same / total, steps, M


@functools.partial(jax.jit, static_argnames=("ranks", "max_steps",
                                             "check_every", "margin",
                                             "relax", "momentum"))
def _explain(W_primes, lo, hi, W, key, start, **kw):
  fn = functools.partial(_explain_layer, **kw)
  if W_primes.ndim == 4:
    # One layer at a time (lax.map): each stops when it is explained.
    return jax.lax.map(lambda a: fn(*a[:4], key, a[4]),
                       (W_primes, lo, hi, W, start))
  return fn(W_primes, lo, hi, W, key, start)


def explain_releases(W_primes, W, rank: Rank, *, max_steps: int = 32000,
                     check_every: int = 250, margin: float = 1e-4,
                     relax: float = EXPLAIN_RELAX,
                     momentum: float = EXPLAIN_MOMENTUM, seed: int = 0,
                     start=None) -> Explanation:
  """Looks for rank-``r_i`` updates with which ``W`` reproduces every release.

  A check of a recovered base that needs no ground truth: it searches for
  updates ``M_i`` of rank at most ``r_i`` such that rounding ``W + M_i`` to
  the release dtype gives every released value ``W'_i`` bit for bit. Found,
  they are a witness that the releases are *exactly* consistent with ``W``:
  no method that reads only the releases can tell ``W`` from any other base
  that is also explained, so the entries where two explained bases differ
  are not determined by the data. (The true base is always explained, by
  the true updates.)

  The search is alternating projections in float64 (float32 cannot resolve
  the rounding intervals' edges) with heavy-ball ``momentum`` (each step
  projects ``M + momentum (M - M_prev)``) and over-relaxed by ``relax``:
  onto the box ``lo_i - W <= M_i <= hi_i - W`` narrowed by ``margin`` of
  each interval's width at both ends (so that the witness rounds correctly
  whatever float64 or float32 rounding happens on the way), and back onto
  rank ``r_i`` (one warm-started subspace-iteration SVD). Every ``check_every``
  projections it rounds ``W + M_i`` and stops once every value is
  reproduced. Released zeros are the exception: a bfloat16 zero says
  ``|W + M_i| < 4.6e-41``, beyond float64's reach next to weights of
  ordinary size, so they count as reproduced where ``|W + M_i|`` is below
  ``1e-12`` times the layer's largest released magnitude (either sign).
  Each projection costs about two float64 passes over the stack.
  On the real MiniLM fine-tunes released in bf16 (384x384 layers, n=3,
  r=16) the true base is explained within 250 projections on every layer
  and ``auto``'s output within 500. Over-relaxed by 1.9 without momentum
  the true base took up to 3750, and the output of the grid step without
  re-reading or momentum up to 27000 (docs/results.md, "Momentum in the
  grid step's projections").

  Args:
    W_primes: ``[n, d, k]`` or ``[L, n, d, k]`` bfloat16/float16 releases.
    W: the base to check, ``[d, k]`` or ``[L, d, k]`` (any float dtype).
    rank: LoRA rank, an int or one per LoRA.
    max_steps: projections before giving up (``explained`` then False:
      not found, which is not a proof that none exists).
    check_every: projections between checks.
    margin: fraction of each rounding interval kept clear at both ends.
    relax: over-relaxation of the box projection, in ``(0, 2)``.
    momentum: heavy-ball momentum of the projections, in ``[0, 1)``.
    seed: seed of the initial sketch.
    start: optional ``[..., n, d, k]`` updates to start the search from
      instead of ``W'_i - W`` (truncated to rank ``r_i`` first), e.g. the
      witness of a base that differs from ``W`` at a few entries: the search
      then has only those entries to mend.

  Returns:
    An :class:`Explanation` (numpy arrays).

  >>> import jax, jax.numpy as jnp
  >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  >>> W = (jax.random.normal(k1, (32, 24)) * 0.02).astype(jnp.bfloat16)
  >>> B = jax.random.normal(k2, (3, 32, 2)) * 0.1
  >>> A = jax.random.normal(k3, (3, 2, 24)) * 0.1
  >>> W_primes = (W.astype(jnp.float32) + B @ A).astype(jnp.bfloat16)
  >>> bool(explain_releases(W_primes, W, 2).explained)
  True
  >>> bool(explain_releases(W_primes, W_primes[0], 2, max_steps=500).explained)
  False
  """
  W_primes, ranks = _checked_releases(W_primes, rank, "explain_releases")
  d, k = W_primes.shape[-2:]
  W = np.asarray(jnp.asarray(W, jnp.float32), np.float64)
  if W.shape != W_primes.shape[:-3] + (d, k):
    raise ValueError(f"W has shape {W.shape}, expected "
                     f"{W_primes.shape[:-3] + (d, k)}")
  if int(max_steps) < 0 or int(check_every) < 1:
    raise ValueError("max_steps must be >= 0 and check_every >= 1, got "
                     f"{max_steps} and {check_every}")
  if not 0.0 <= float(margin) < 0.5:
    raise ValueError(f"margin must be in [0, 0.5), got {margin}")
  if not 0.0 < float(relax) < 2.0:
    raise ValueError(f"relax must be in (0, 2), got {relax}")
  if not 0.0 <= float(momentum) < 1.0:
    raise ValueError(f"momentum must be in [0, 1), got {momentum}")
  if start is not None:
    start = np.asarray(start, np.float64)
    if start.shape != W_primes.shape:
      raise ValueError(f"start has shape {start.shape}, expected "
                       f"{W_primes.shape}")
  lo, hi = (np.asarray(x, np.float64) for x in rounding_interval(W_primes))
  with jax.enable_x64(True):
    out = _explain(W_primes, lo, hi, W, jax.random.key(seed), start,
                   ranks=ranks,
                   max_steps=int(max_steps), check_every=int(check_every),
                   margin=float(margin), relax=float(relax),
                   momentum=float(momentum))
    explained, reproduced, steps, M = (np.asarray(x) for x in out)
  return Explanation(explained=explained, reproduced=reproduced, steps=steps,
                     updates=M)


def first_order_margin(W_primes, W, updates, rank: Rank, *,
                       cap: float = 0.25) -> np.ndarray:
  """How deep a first-order step of the updates takes each release into its
  rounding intervals: a fast test of whether a base can be explained.

  For release ``i`` it solves a linear program: the largest ``t`` such that
  some ``T`` in the tangent space of the rank-``r_i`` matrices at
  ``updates[i]`` (``T = U X^T + Y V^T`` with ``U, V`` the singular vectors
  of ``updates[i]``) puts every value of ``W + updates[i] + T`` at least
  ``t`` of its rounding interval's width inside that interval (``t`` at
  most ``cap``). ``t >= 0``: to first order, some rank-``r_i`` update next
  to ``updates[i]`` reproduces release ``i`` with base ``W``. ``t < 0``:
  none does; every first-order step misses some value by at least ``-t`` of
  its interval's width. The test is local: what it leaves out is the
  curvature of the rank-``r_i`` matrices (of order ``|T|^2 / sigma_r``)
  and updates far from ``updates[i]``; it is evidence, not a proof. Used
  with ``updates`` a witness of a nearby base (:func:`explain_releases`),
  e.g. the true base with one entry changed: at 64x64, rank 2, the search
  explained the changed base at 139 of 160 entries, all with ``t >= 0`` on
  every release; of the other 21, 19 have ``t < 0`` on some release and 2
  are at the edge (below 0.002; docs/results.md). Released zeros count as
  reproduced within ``1e-12`` times the layer's largest released
  magnitude, as in :func:`explain_releases`. Each release is an LP with
  ``d * k`` two-sided rows and ``r_i (d + k)`` unknowns (scipy's HiGHS, by
  constraint generation; about a second at 64x64 rank 2, 37 s at 256x256
  rank 4 on the shared machine, docs/results.md).

  Args:
    W_primes: ``[..., n, d, k]`` bfloat16/float16 releases.
    W: the base, ``[..., d, k]``.
    updates: ``[..., n, d, k]`` rank-``r_i`` updates, e.g. a witness.
    rank: LoRA rank, an int or one per LoRA.
    cap: the largest margin sought (``t`` is at most this).

  Returns:
    float64 ``[..., n]`` array of the margins ``t``.

  >>> import jax, jax.numpy as jnp
  >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  >>> W = (jax.random.normal(k1, (32, 24)) * 0.02).astype(jnp.bfloat16)
  >>> B = jax.random.normal(k2, (3, 32, 2)) * 0.1
  >>> A = jax.random.normal(k3, (3, 2, 24)) * 0.1
  >>> W_primes = (W.astype(jnp.float32) + B @ A).astype(jnp.bfloat16)
  >>> witness = explain_releases(W_primes, W, 2).updates
  >>> bool((first_order_margin(W_primes, W, witness, 2) >= 0).all())
  True
  >>> far = W.at[0, 0].add(0.5)
  >>> bool((first_order_margin(W_primes, far, witness, 2) < 0).any())
  True
  """
  W_primes, ranks = _checked_releases(W_primes, rank, "first_order_margin")
  shape = W_primes.shape
  W = np.asarray(jnp.asarray(W, jnp.float32), np.float64)
  updates = np.asarray(updates, np.float64)
  if W.shape != shape[:-3] + shape[-2:] or updates.shape != shape:
    raise ValueError(f"W has shape {W.shape} and updates {updates.shape}, "
                     f"expected {shape[:-3] + shape[-2:]} and {shape}")
  lo, hi = (np.asarray(x, np.float64) for x in rounding_interval(W_primes))
  released = np.asarray(W_primes.astype(jnp.float32), np.float64)
  W_primes = released.reshape((-1,) + shape[-3:])
  lo, hi = (x.reshape(W_primes.shape) for x in (lo, hi))
  W = W.reshape((-1,) + shape[-2:])
  updates = updates.reshape(W_primes.shape)
  out = np.zeros(W_primes.shape[:2])
  zero_tol = 1e-12 * np.max(np.abs(W_primes), axis=(1, 2, 3))
  for l, i in np.ndindex(*out.shape):
    zero = W_primes[l, i] == 0
    out[l, i] = _tangent_margin(
        W[l] + updates[l, i], np.where(zero, -zero_tol[l], lo[l, i]),
        np.where(zero, zero_tol[l], hi[l, i]), updates[l, i], ranks[i], cap)
  return out.reshape(shape[:-2])


def _tangent_margin(c, lo, hi, M, r: int, cap: float) -> float:
  """``max t`` such that ``lo + t w <= c + U X^T + Y V^T <= hi - t w``
  (``w = hi - lo``, ``U, V`` the top-``r`` singular vectors of ``M``).

  Solved by constraint generation: an LP over the rows that bind, starting
  from the values with the least room, adding the rows its solution
  violates until there are none. The answer is the full LP's (few of the
  ``2 d k`` rows bind; HiGHS's simplex on all of them at once had not
  ended after 20 minutes at 256x256 rank 4). Each LP is solved by HiGHS's
  interior point method: on a 48x48 rank-2 swap run it took two thirds of
  the simplex's time and gave the same margins to 1e-9 (docs/results.md)."""
  from scipy import sparse  # pylint: disable=g-import-not-at-top
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  d, k = c.shape
  U, _, Vt = np.linalg.svd(M, full_matrices=False)
  U, V = U[:, :r], Vt[:r].T
  w = (hi - lo).ravel()
  # Rows in units of each value's interval, unknowns in units of a typical
  # interval: HiGHS's absolute tolerances (1e-7) then mean the same thing
  # for every value, large or small.
  scale = np.median(w)
  j, m = (x.ravel() for x in np.indices((d, k)))
  cols = np.concatenate([m[:, None] * r + np.arange(r),
                         k * r + j[:, None] * r + np.arange(r)], axis=1)
  vals = np.concatenate([U[j], V[m]], axis=1) * (scale / w)[:, None]
  step = sparse.csr_matrix(
      (vals.ravel(), cols.ravel(), np.arange(0, vals.size + 1, 2 * r)),
      shape=(d * k, r * (d + k)))
  room_lo = (c.ravel() - lo.ravel()) / w  # >= t after the step, per value
  room_hi = (hi.ravel() - c.ravel()) / w
  nvar = r * (d + k)
  cost = np.zeros(nvar + 1)
  cost[-1] = -1.0
  # The unknowns bounded far beyond any step that keeps the values in
  # their intervals, so that an LP over a few rows is bounded too.
  bounds = [(-1e6, 1e6)] * nvar + [(None, cap)]
  # Rows: a value's index for its lower side, the index + d * k for its
  # upper side. The first LP has the side with less room of the values
  # with the least room, one per unknown.
  size = room_lo.size
  rows = np.argsort(np.minimum(room_lo, room_hi))[:nvar]
  active = np.where(room_lo[rows] <= room_hi[rows], rows, rows + size)
  while True:
    lower, upper = active[active < size], active[active >= size] - size
    A = sparse.vstack([
        sparse.hstack([-step[lower], np.ones((lower.size, 1))]),
        sparse.hstack([step[upper], np.ones((upper.size, 1))])]).tocsr()
    res = optimize.linprog(
        cost, A_ub=A, b_ub=np.concatenate([room_lo[lower], room_hi[upper]]),
        bounds=bounds, method="highs-ipm")
    if res.status != 0:
      raise RuntimeError(f"first_order_margin: the LP failed: {res.message}")
    t, moved = res.x[-1], step @ res.x[:-1]
    slack = np.concatenate([room_lo + moved, room_hi - moved]) - t
    # Rows the solution violates beyond HiGHS's tolerance, worst first.
    bad = np.flatnonzero(slack < -1e-6)
    bad = np.setdiff1d(bad, active)
    if not bad.size:
      return float(t)
    bad = bad[np.argsort(slack[bad])][:max(nvar, 1000)]
    active = np.concatenate([active, bad])


def determined_fraction(W_primes, M, W_true):
  """An upper bound on what the data allow: the share of weights the
  releases determine *if the updates were known*.

  Given the *true* updates ``M`` (``[..., n, d, k]`` float32, e.g. the
  float32 ``W'_i - W`` of a synthetic release), an entry of ``W_true`` is
  determined when the intersection of its rounding intervals ``[lo_i -
  M_i, hi_i - M_i]`` holds no other grid point: no estimator that reads
  only the releases can pin more entries. The releases alone can pin fewer,
  since the updates are unknown too: where two bases that both
  :func:`explain_releases` differ, neither is determined (on real MiniLM
  fine-tunes in bf16 that bound is 1.7-1.9 points lower; docs/results.md).
  Evaluation only (it needs the truth).

  Returns:
    ``(determined, midrange)``: that share, and the bit-exact share of
    :func:`interval_estimate` from the true ``M``.
  """
  W_primes, W_true = jnp.asarray(W_primes), jnp.asarray(W_true)
  lo, hi = rounding_interval(W_primes)
  M = jnp.asarray(M, jnp.float32)
  _, determined = open_neighbours(lo, hi, M, W_true)
  W_mid, _, _ = _estimate(W_primes, lo, hi, M, "midrange")
  return (float(jnp.mean(determined.astype(jnp.float32))),
          float(bit_exact_fraction(W_mid, W_true)))


def open_neighbours(lo, hi, M, W_true):
  """``(moved, determined)`` given the true updates ``M``: ``W_true``
  (float32) with each entry whose intersection ``[lo_i - M_i, hi_i -
  M_i]`` holds a neighbouring grid point moved to it, and the bool mask of
  the entries where it holds neither (those :func:`determined_fraction`
  counts). Evaluation only."""
  lower, upper = _intersection(lo, hi, M)
  up = _next_toward(W_true, up=True).astype(jnp.float32)
  down = _next_toward(W_true, up=False).astype(jnp.float32)
  moved = jnp.where(up <= upper, up, jnp.where(
      down >= lower, down, W_true.astype(jnp.float32)))
  return moved, (up > upper) & (down < lower)


def bit_exact_mask(W, W_true):
  """Bool mask of the entries of ``W`` that equal ``W_true`` bit for bit.

  ``W`` is rounded to ``W_true``'s dtype first (as a release would be).
  """
  W_true = jnp.asarray(W_true)
  W = jnp.asarray(W).astype(W_true.dtype)
  n = W_true.dtype.itemsize
  if n not in _UINT:
    return W == W_true
  return (jax.lax.bitcast_convert_type(W, _UINT[n]) ==
          jax.lax.bitcast_convert_type(W_true, _UINT[n]))


def bit_exact_fraction(W, W_true):
  """Fraction of entries of ``W`` that equal ``W_true`` bit for bit
  (:func:`bit_exact_mask`).

  >>> import jax.numpy as jnp
  >>> float(bit_exact_fraction(jnp.asarray([1.0, 2.0]), jnp.asarray([1.0, 3.0])))
  0.5
  """
  return jnp.mean(bit_exact_mask(W, W_true).astype(jnp.float32))
