"""Diagnostics of recoveries from low-precision releases, apart from the
grid step itself.

What :func:`detune_jax.solvers.grid.grid_refine` leaves open, measured
without ground truth (:func:`explain_releases`: can the releases be
reproduced bit for bit with a base? :func:`first_order_margin`: can they,
to first order, near a known witness?) and with it
(:func:`determined_fraction`, :func:`open_neighbours`: what the data allow
if the updates were known). ``recover --explain_steps`` runs
:func:`explain_releases` on its output; the rest serves studies and tests.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from detune_jax.solvers import lowrank
from detune_jax.solvers.grid import (_UINT, _checked_releases, _estimate,
                                     _heavy_ball, _intersection, _narrowed,
                                     _next_toward, _truncation,
                                     bit_exact_fraction, rounding_interval)
from detune_jax.solvers.spectral_detuning import Rank

# explain_releases' projections: heavy-ball momentum, no over-relaxation:
# they find witnesses several times sooner than over-relaxed ones (relax
# 1.9, no momentum; ``git show 328b8e0:docs/results.md``, "Momentum in the
# grid step's projections").
EXPLAIN_RELAX = 1.0
EXPLAIN_MOMENTUM = 0.9


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
  re-reading or momentum up to 27000 (``git show 328b8e0:docs/results.md``,
  "Momentum in the grid step's projections").

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
  are at the edge (below 0.002; ``git show 328b8e0:docs/results.md``, "Low
  ranks: the entries not shown open are closed to first order"). Released
  zeros count as reproduced within ``1e-12`` times the layer's largest
  released magnitude, as in :func:`explain_releases`. Each release is an
  LP with ``d * k`` two-sided rows and ``r_i (d + k)`` unknowns (scipy's
  HiGHS, by constraint generation; about a second at 64x64 rank 2, 37 s
  at 256x256 rank 4 on the shared machine: the same diary, that section
  and "256x256 r=4: a sample of the entries not shown open").

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
  the simplex's time and gave the same margins to 1e-9 (``git show
  328b8e0:docs/results.md``, "256x256 r=4: a sample of the entries not
  shown open")."""
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
  :func:`explain_releases` differ, neither is determined (on the real
  MiniLM fine-tunes in bf16, n=3, the identifiable bound from such bases
  is 96.35%, 2.3 points below this share's 98.62%; docs/results.md, "What
  the releases determine").
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

