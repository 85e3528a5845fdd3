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
so that a better ``W`` gives better ``M_i`` and back. :class:`GridSettings`
holds the step's settings as :func:`detune_jax.solve` runs it; checks of
its output are in :mod:`detune_jax.solvers.grid_diagnostics`.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from detune_jax.solvers import lowrank
from detune_jax.solvers.spectral_detuning import (Rank, normalize_ranks,
                                                  stack_mean)

LOW_PRECISION_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Defaults of grid_refine's annealing and narrowed box (docs/results.md,
# "The grid step's settings").
SNAP_FROM = 0.2
SHRINK = 0.04
# Projections of the consistency check that decides whether a re-read base is
# kept (grid_refine's ``check_steps``).
CHECK_STEPS = 100
# Heavy-ball extrapolation of the grid step's projections onto rank r_i
# (grid_refine's ``momentum``; docs/results.md, "The grid step's
# settings").
MOMENTUM = 0.9
# Projections of the updates alone before the grid step's alternation
# (grid_refine's ``free_steps``).
FREE_STEPS = 100
_UINT = {2: jnp.uint16, 4: jnp.uint32}


class GridSettings(NamedTuple):
  """Settings of the dtype-aware grid step that :func:`detune_jax.solve`
  runs after the layer solver on bfloat16/float16 releases (its ``grid``).

  The defaults are what ``recover`` runs; the gains below are bit-exact
  shares measured in docs/results.md, "The grid step's settings", unless
  another section is named ("MiniLM": real all-MiniLM-L6-v2 fine-tunes
  released in bf16, n=3 unless said). Figures from before the momentum
  are in the measurement diary, ``git show 328b8e0:docs/results.md``
  ("the diary" below), in the section named. Other values serve
  ablations (``detune_jax.pipeline.RecoverConfig(grid=...)``). All but
  ``min_consistent`` are :func:`grid_refine`'s arguments of the same name
  (:meth:`refine_options`).

  Attributes:
    steps: alternations per round. With momentum, 1000 alternations gain
      0.004 points on MiniLM (97.444% against 97.440%) for about 3x the
      time; before the momentum they gained 0.12 points for 5.0x (the
      diary, "A longer grid alternation").
    restarts: rounds run again from the previous round's ``W``; a better
      ``W`` gives better starting ``M_i``, so they gain where the first
      round's ``W`` was wrong. With momentum one restart gains 97.42% ->
      97.44% on MiniLM and none at 1024x1024 r=8, for 1.5x the time on
      MiniLM. Before the momentum: MiniLM 96.4% -> 96.6% (n=3) and 97.7% ->
      97.8% (n=5), against 96.7% / 97.8% for the grid step started from the
      true base, ``auto`` taking 1.3x to 1.9x as long (the diary,
      "Bit-exact weights of bf16 releases"). A small gain, kept: the most
      weights back is what the tool is for.
    redecode_steps: projections of the re-reading of the entries in doubt
      (0: off). With momentum, n=3: 98.71% -> 99.23% at 1024x1024 r=8 (the
      share the true updates determine: 99.01%, docs/results.md, "Bit-exact
      share by layer size and rank") and 96.84% -> 97.44% on MiniLM (r=16),
      for 3x the time on MiniLM; without momentum it gained 0.02 on MiniLM
      (the diary, "Re-reading the entries in doubt"). It gains where
      updates have few parameters per weight and keeps the base where they
      do not.
    snap_from: the first alternation's snapping distance ``tau``, in ``[0,
      1/2]``; 1/2 snaps every entry from the start. MiniLM, with the
      narrowed box, before the re-reading and momentum: 95.6% snapped from
      the start, 96.6% annealed from 0.2.
    shrink: fraction of each rounding interval's width taken off both ends
      of the M-step's box, in ``[0, 1/2)``. Projections onto a box end on
      its faces; a slightly narrower box keeps the ``M_i`` inside the true
      one, so that a grid value one step off is not matched as easily
      (MiniLM: 97.41% with 0, 97.44% with 0.04; before the momentum, with
      annealing, 96.0% and 96.6%: the diary, "Bit-exact weights of bf16
      releases").
    momentum: heavy-ball extrapolation of the projections onto rank
      ``r_i``, in ``[0, 1)``. Alternating projections creep along the narrow
      region where the box and the rank-``r_i`` matrices nearly meet; the
      extrapolation gets them further, for one more pass over the stack
      per projection (up to 1.2x the time: docs/results.md, "Time of the
      grid step, and of the check without ground truth"). With the
      re-reading, n=3: 64x64 r=2 98.1% -> 98.8%, 256x256 r=16 95.2% ->
      96.3%, MiniLM 96.6% -> 97.4% (docs/results.md, "Bit-exact share by
      layer size and rank").
    free_steps: projections of the ``M_i`` alone before the alternation (0:
      none): entries where the start is wrong do not pull the ``M_i`` toward
      it (MiniLM: 97.44% against 97.41% without; before the annealing and
      the momentum, on 6 of its layers, 94.2% against 92.9%: the diary,
      "Bit-exact weights of bf16 releases").
    min_consistent: layers whose grid step ends with a smaller
      :attr:`GridDiagnostics.consistent_fraction` keep the solver's
      estimate (0: never). The step assumes that the base lies on the
      release dtype's grid and that each release rounds it plus a low-rank
      update. Where that is false, e.g. fine-tunes of a float32 base each
      rounded to bf16 on its own, its output is worse than its input
      (MiniLM: W-Error against the float32 base -8.36 for the closed form,
      -7.81 after the step). The fraction tells the two apart: 0.91 to 0.98
      where the model holds, 0.10 to 0.38 where it does not (bf16 and
      fp16, n = 3 to 8, synthetic and MiniLM layers; "Releases not rounded
      from a base on the grid"). With two releases the step ends at 0.55 to
      0.58 either way and is skipped too; it gained nothing there (at most
      0.1 points and 0.01 W-Error; the diary, same section).

  >>> GridSettings(restarts=0).refine_options()["restarts"]
  0
  """
  steps: int = 100
  restarts: int = 1
  redecode_steps: int = 300
  snap_from: float = SNAP_FROM
  shrink: float = SHRINK
  momentum: float = MOMENTUM
  free_steps: int = FREE_STEPS
  min_consistent: float = 0.75

  def refine_options(self) -> dict:
    """The settings as :func:`grid_refine`'s keyword arguments."""
    options = self._asdict()
    del options["min_consistent"]
    return options


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
  # grid step's loops: ``auto`` on one 2048x2048 bf16 layer (r=16, n=3)
  # took 74.7 s with the reduction and 33.0 s with this loop (``git show
  # 328b8e0:docs/results.md``, "The grid step on large layers").
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


class _Releases(NamedTuple):
  """One layer's releases as the grid step's projections read them."""
  W_primes: jnp.ndarray   # [n, d, k] in the release dtype
  Wf: jnp.ndarray         # the same in float32
  lo: jnp.ndarray         # their rounding intervals (rounding_interval)
  hi: jnp.ndarray
  truncate: Callable      # _truncation of the LoRAs' ranks
  q: int                  # columns of the M-step's subspace
  key: jnp.ndarray        # seed of the initial sketch


def _start(rel: _Releases, W0):
  """M_i from the truncated SVD of W'_i - W0 (and its right vectors)."""
  U, S, V = jax.vmap(lambda a: lowrank.svd_randomized(a, rel.q, rel.key, 2))(
      rel.Wf - W0[None])
  return rel.truncate(U, S, V), V


def _free_projection(rel: _Releases, _, c):
  """One projection of the ``(M, V)`` carry onto the updates consistent with
  *some* real W per entry (the intervals [lo_i - M_i, hi_i - M_i] share a
  point), then onto rank r_i."""
  # No grid W is involved: entries of W0 that are wrong do not pull the M_i
  # toward them. M_i is clipped only where the intervals disagree, toward
  # the centre of their hull.
  M, V = c
  w = 0.5 * sum(_intersection(rel.lo, rel.hi, M))
  Z = jnp.clip(M, rel.lo - w[None], rel.hi - w[None])
  U, S, V = jax.vmap(lowrank.svd_subspace)(Z, V)
  return rel.truncate(U, S, V), V


def _alternation_step(rel: _Releases, box, steps: int, snap_from: float,
                      estimator: str, s, c):
  """Step ``s`` of the alternation: the M-step onto ``box``, then the W-step.

  The carry is ``(M, W, centre, V, changed)``: W is carried in the
  low-precision dtype so that it stays on the grid, and centre is what the
  W-step rounded to get it.
  """
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
  M = rel.truncate(U, S, V)
  W_new, _, centre = _estimate(rel.W_primes, rel.lo, rel.hi, M, estimator)
  return M, W_new, centre, V, jnp.sum(W_new != W).astype(jnp.int32)


def _round(rel: _Releases, W0, box, *, steps, free_steps, snap_from,
           estimator, momentum):
  """M_i from the truncated SVD of W'_i - W0, the free projections, then
  the alternation (its M-step's box: ``box``).

  Returns:
    ``(W, M, changed)``: float32 ``W`` on the grid, its updates, and the
    entries the last alternation changed.
  """
  M, V = _start(rel, W0)
  if free_steps:
    M, V = _extrapolated(free_steps, functools.partial(_free_projection, rel),
                         (M, V), momentum)
  W, _, centre = _estimate(rel.W_primes, rel.lo, rel.hi, M, estimator)
  M, W, _, V, changed = _extrapolated(
      steps, functools.partial(_alternation_step, rel, box, steps, snap_from,
                               estimator),
      (M, W, centre, V, jnp.asarray(0, jnp.int32)), momentum)
  return W.astype(jnp.float32), M, changed


def _reproduced(rel: _Releases, W, check_steps: int):
  """Share of the released values that rank-r_i updates reproduce with
  ``W`` after ``check_steps`` projections onto the box ``lo_i - W <= M_i
  <= hi_i - W`` and back onto rank r_i (float32; from the truncated SVD
  of W'_i - W): how consistent the releases are with ``W``."""
  def project(_, c):
    M, V = c
    U, S, V = jax.vmap(lowrank.svd_subspace)(
        jnp.clip(M, rel.lo - W[None], rel.hi - W[None]), V)
    return rel.truncate(U, S, V), V
  M, _ = jax.lax.fori_loop(0, check_steps, project, _start(rel, W))
  X = W[None] + M
  return jnp.mean((X >= rel.lo) & (X <= rel.hi))


def _redecode(rel: _Releases, W0, W, M_old, round_options, *,
              redecode_steps: int, check_steps: int, momentum: float):
  """Re-reads the entries where the alternation from ``W0`` with the full
  box (no shrink) ends elsewhere than ``W``: the M_i are fitted to the other
  entries, those entries held only to intervals that share a point (as in
  the free projections), and the entries are then read off the
  intersection of the intervals.

  Returns:
    ``(W', M', kept)``: the re-read base and its updates where the releases
    are more consistent with it than with ``W`` (else ``W`` and ``M_old``).
  """
  lo, hi = rel.lo, rel.hi
  # Each LAPACK-running part after the one before it (lowrank.after).
  W_full, _, _ = _round(rel, lowrank.after(W0, W), (lo, hi), **round_options)
  doubt = W_full != W

  def project(_, c):
    M, V = c
    w = jnp.where(doubt, 0.5 * sum(_intersection(lo, hi, M)), W)
    U, S, V = jax.vmap(lowrank.svd_subspace)(
        jnp.clip(M, lo - w[None], hi - w[None]), V)
    return rel.truncate(U, S, V), V

  M, _ = _extrapolated(redecode_steps, project,
                       _start(rel, lowrank.after(W, W_full)), momentum)
  W_new, _, _ = _estimate(rel.W_primes, lo, hi, M, "midrange")
  W_new = jnp.where(doubt, W_new.astype(jnp.float32), W)
  consistent_new = _reproduced(rel, W_new, check_steps)
  kept = consistent_new > _reproduced(rel, lowrank.after(W, consistent_new),
                                      check_steps)
  return jnp.where(kept, W_new, W), jnp.where(kept, M, M_old), kept


def _refine_layer(W_primes, W0, key, *, ranks, steps, estimator, oversample,
                  free_steps, restarts, snap_from, shrink, redecode_steps,
                  check_steps, momentum):
  """:func:`grid_refine` of one ``[n, d, k]`` layer."""
  n, d, k = W_primes.shape
  q = min(max(ranks) + oversample, d, k)
  truncate = _truncation(ranks, q)
  Wf = W_primes.astype(jnp.float32)
  lo, hi = rounding_interval(W_primes)
  rel = _Releases(W_primes, Wf, lo, hi, truncate, q, key)
  # The alternation's box, narrowed by `shrink` of each interval's width at
  # both ends.
  box = _narrowed(lo, hi, shrink)
  round_options = dict(steps=steps, free_steps=free_steps,
                       snap_from=snap_from, estimator=estimator,
                       momentum=momentum)
  W, M, changed = _round(rel, W0, box, **round_options)
  if restarts:
    W, M, changed = jax.lax.fori_loop(
        0, restarts, lambda _, c: _round(rel, c[0], box, **round_options),
        (W, M, changed))
  redecoded = jnp.asarray(False)
  if redecode_steps:
    W, M, redecoded = _redecode(rel, W0, W, M, round_options,
                                redecode_steps=redecode_steps,
                                check_steps=check_steps, momentum=momentum)
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
  ``M_i`` toward it. Then it alternates ``steps`` times: the M-step
  projects each ``M_i`` onto the box of updates consistent with the
  rounding intervals of ``W'_i`` given ``W`` (``lo_i - W <= M_i <= hi_i -
  W``, narrowed by ``shrink``) and back onto rank ``r_i`` (one
  warm-started subspace-iteration SVD): alternating projections, which find
  a low-rank update consistent with every rounded entry and so beat the
  plain truncated SVD, whose error is the noise projected on the
  subspaces; the W-step is :func:`interval_estimate`. The M-step's box is
  centred on the grid ``W`` only at entries whose intersection centre lies
  within ``tau`` grid steps of it, ``tau`` growing from ``snap_from`` to
  1/2 over the alternation, and on the (continuous) centre elsewhere:
  annealing from the free projection to the grid, so that entries whose
  rounding is in doubt do not lock the ``M_i`` onto a wrong grid value
  before the ``M_i`` are good enough to decide them. :class:`GridSettings`
  says what each setting gains, as measured (docs/results.md, "The grid
  step's settings").

  Args:
    W_primes: ``[n, d, k]`` or ``[L, n, d, k]`` bfloat16/float16 inputs (the
      released fine-tunes, not upcast).
    W0: float estimate of ``W`` (``[d, k]`` or ``[L, d, k]``), e.g. from
      :func:`subspace_intersection_detuning` or ``spectral_detuning``.
    rank: LoRA rank, an int or one per LoRA.
    steps: maximum alternations per round.
    estimator: see :func:`interval_estimate`.
    seed: seed of the initial sketch.
    oversample: extra subspace columns of the M-step.
    free_steps: projections of the ``M_i`` before the alternation (0: none).
    restarts: rounds run again from the previous round's ``W`` (the
      truncated SVD of ``W'_i - W``, the free projections, the alternation);
      each costs as much as the first.
    snap_from: the first alternation's ``tau``, in ``[0, 1/2]``; 1/2 snaps
      every entry from the start (the plain alternation).
    shrink: the fraction of each rounding interval's width taken off both
      ends of the M-step's box (``lo_i - W + m_i <= M_i <= hi_i - W - m_i``
      with ``m_i = shrink (hi_i - lo_i)``), in ``[0, 1/2)``. The consistency
      diagnostics use the full intervals.
    redecode_steps: 0, or re-read the entries in doubt after the rounds:
      the alternation is run once more with the full box (``shrink`` 0),
      and the entries where it ends elsewhere are read again. The ``M_i``
      are fitted to the other entries by ``redecode_steps`` projections,
      those entries held only to intervals that share a point (as in the
      free projections), and the entries are then read off the intersection
      of the intervals. The re-read base is kept where the releases are
      more consistent with it (a larger share of their values reproduced by
      rank-``r_i`` updates after ``check_steps`` projections, float32).
    check_steps: projections of that consistency check.
    momentum: heavy-ball extrapolation of the projections onto rank
      ``r_i`` (the free ones, the alternation's M-steps and the
      re-reading's fit), in ``[0, 1)``: each projects ``M + momentum (M -
      M_prev)``, not ``M``. The consistency check is not extrapolated.

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
  _check_settings(restarts=restarts, snap_from=snap_from, shrink=shrink,
                  momentum=momentum, redecode_steps=redecode_steps,
                  check_steps=check_steps)
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


def _check_settings(*, restarts, snap_from, shrink, momentum, redecode_steps,
                    check_steps):
  """A ValueError naming the first of :func:`grid_refine`'s settings that is
  out of its range."""
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
