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

from detune_jax import memory, programs
from detune_jax.solvers import lowrank
from detune_jax.solvers.schedule import (RankSchedule, rank_schedule_init,
                                         rank_schedule_step)

Rank = Union[int, Sequence[int]]


@programs.register_output
class Diagnostics(NamedTuple):
  """What a solve did. With a layer axis every field gains a leading ``L``.

  Attributes:
    loss: ``[steps]`` float32 loss of Eq. 3 (mean squared residual, averaged
      over LoRAs) after each step; ``nan`` after an early stop.
    rank: ``[steps, n]`` int32 working rank of each LoRA at each step; ``0``
      after an early stop.
    steps: int32 number of steps taken.
    final_rank: ``[n]`` int32 working rank of the last step taken.
    final_loss: float32 loss after the last step taken (always computed on
      the dense residuals).
    w_error: ``[steps]`` float32 ``log10 MSE(W - W_true)`` after each step
      when ``W_true`` was given (evaluation only), else ``None``.
  """
  loss: jnp.ndarray
  rank: jnp.ndarray
  steps: jnp.ndarray
  final_rank: jnp.ndarray
  final_loss: jnp.ndarray
  w_error: Optional[jnp.ndarray] = None


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


def check_stack(W_primes):
  """``W_primes`` as a floating ``[n, d, k]`` or ``[L, n, d, k]`` jax array."""
  W_primes = jnp.asarray(W_primes)
  if W_primes.ndim not in (3, 4):
    raise ValueError("W_primes must be [n, d, k] or [L, n, d, k], got shape "
                     f"{tuple(W_primes.shape)}")
  if not jnp.issubdtype(W_primes.dtype, jnp.floating):
    raise ValueError(f"W_primes must be floating point, got {W_primes.dtype}")
  return W_primes


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


def _mean_of_stack(W_primes):
  n = W_primes.shape[-3]
  return functools.reduce(
      jnp.add, [W_primes[..., i, :, :] for i in range(n)]) / n


def _subtract_mean(W_primes, W_bar):
  return W_primes - W_bar[..., None, :, :]


_mean_jit = jax.jit(_mean_of_stack)
_subtract_jit = jax.jit(_subtract_mean)
# Writes D into the input's buffer: no second copy of the stack.
_subtract_donating = jax.jit(_subtract_mean, donate_argnums=0)


def _center(W_primes, donate: bool = False):
  """``(D, W_bar)``: deviations ``W'_i - W_bar`` from the mean and the mean.

  Works on ``[n, d, k]`` and ``[L, n, d, k]``. The rounding of ``W_bar`` is
  recovered later from ``stack_mean(D)`` (which is ``mean - W_bar`` to within
  rounding of the small ``D``), so the final ``W`` is as exact as float32
  allows. Two programs, not one: XLA compiles the fused mean-and-subtract
  with a temporary copy of the whole stack, while an elementwise subtract
  on its own runs in place in the donated buffer (``memory_analysis`` of
  the fused program on a 12 x 4096 x 4096 stack: 768 MiB of temporaries;
  of the two: none).
  """
  W_bar = _mean_jit(W_primes)
  sub = _subtract_donating if donate else _subtract_jit
  return sub(W_primes, W_bar), W_bar


def _lowrank_apply(P, V, X):
  """``E @ X_i`` for every i, with ``E = mean_j P_j V_j^T``; X: [n, k, p]."""
  G = jnp.einsum("jkq,ikp->ijqp", V, X)                      # V_j^T X_i
  return jnp.einsum("jdq,ijqp->idp", P, G) / P.shape[0]


def _lowrank_apply_rows(P, V):
  """``(E V_i, T_i)`` for every i, with ``E = mean_j P_j V_j^T``: the product
  :func:`_lowrank_apply` with ``X = V``, and from the diagonal blocks
  ``V_i^T V_i`` of its Gram matrix the ``[n, q, q]`` transforms ``T_i`` with
  ``V_i T_i`` orthonormal (see :func:`lowrank.orthonormalizer`)."""
  G = jnp.einsum("jkq,ikp->ijqp", V, V)                      # V_j^T V_i
  EV = jnp.einsum("jdq,ijqp->idp", P, G) / P.shape[0]
  VtV = jnp.moveaxis(jnp.diagonal(G, axis1=0, axis2=1), -1, 0)
  return EV, jax.vmap(lowrank.orthonormalizer)(VtV)


def _lowrank_apply_t(P, V, Q):
  """``Q_i^T @ E`` for every i, with ``E = mean_j P_j V_j^T``; Q: [n, d, p]."""
  G = jnp.einsum("idp,jdq->ijpq", Q, P)                      # Q_i^T P_j
  return jnp.einsum("ijpq,jkq->ipk", G, V) / P.shape[0]


# The left products go by blocks of rows on stacks of more than
# _LEFT_BLOCKED_ELEMS elements (256 MiB of float32), each block about
# _LEFT_BLOCK_ELEMS elements (8 MiB): see _left_products.
_LEFT_BLOCKED_ELEMS = 1 << 26
_LEFT_BLOCK_ELEMS = 1 << 21


def _add_at(acc, i, x):
  """``acc[i] += x`` in place (``.at[i].add`` is a scatter that XLA:CPU
  writes into a second buffer of the size of ``acc``). Not under vmap,
  where JAX turns the dynamic_update_slice into such a scatter too."""
  return jax.lax.dynamic_update_index_in_dim(
      acc, jax.lax.dynamic_index_in_dim(acc, i, 0, keepdims=False) + x, i, 0)


def _left_products(Q, D, batch: int = 1):
  """``Q_i^T D_i`` for every i (``[n, q, k]``), by blocks of rows of ``D``.

  As one product XLA:CPU packs the whole ``D_i`` (the operand whose rows
  are summed over) into a scratch copy: on a 12 x 4096 x 4096 stack about
  130 MiB of memory beside the stack. A block of rows at a time needs only
  the block's copy. Layers whose stacks have up to ``_LEFT_BLOCKED_ELEMS``
  elements (ViT and SD layers) keep the single product, which is faster (on
  a batch of 24 ViT layers the blocked products doubled a solve's time).

  ``batch``: layers solved together under vmap; the blocks are sized for
  all of them. One layer (``batch == 1``) is done one LoRA at a time with
  the result accumulated in place; a batch (where JAX would turn that
  in-place update into a scatter) a block of every LoRA at a time, adding
  each block's product.
  """
  n, d, k = D.shape
  q = Q.shape[-1]
  if n * d * k <= _LEFT_BLOCKED_ELEMS:
    # (Per layer: XLA packs the operand of one layer's product at a time.)
    return jnp.einsum("ndq,ndk->nqk", Q, D)
  if batch > 1:
    rows = max(1, min(d, _LEFT_BLOCK_ELEMS // (batch * n * k)))

    def rows_block(r0, size, acc):
      Db = jax.lax.dynamic_slice_in_dim(D, r0, size, axis=1)
      Qb = jax.lax.dynamic_slice_in_dim(Q, r0, size, axis=1)
      return acc + jnp.einsum("ndq,ndk->nqk", Qb, Db)

    full, rest = d // rows, d % rows
    acc = jax.lax.fori_loop(0, full, lambda b, a: rows_block(b * rows, rows, a),
                            jnp.zeros((n, q, k), jnp.float32))
    return rows_block(full * rows, rest, acc) if rest else acc
  rows = max(1, min(d, _LEFT_BLOCK_ELEMS // k))
  full, rest = d // rows, d % rows

  def block(i, r0, size, acc):
    Db = jax.lax.dynamic_slice(D, (i, r0, 0), (1, size, k))[0]
    Qb = jax.lax.dynamic_slice(Q, (i, r0, 0), (1, size, q))[0]
    return _add_at(acc, i, Qb.T @ Db)

  def lora(i, acc):
    acc = jax.lax.fori_loop(
        0, full, lambda b, a: block(i, b * rows, rows, a), acc)
    return block(i, full * rows, rest, acc) if rest else acc

  return jax.lax.fori_loop(0, n, lora, jnp.zeros((n, q, k), jnp.float32))


# The last steps of a run take the SVD left step even where the full-width
# one applies: the full-width steps' states sit at a slightly higher float32
# noise floor (24 real MiniLM layers, n=5, r=16: mean final W-Error -17.37
# against -17.50 with every step's SVD); with these 16 steps at the end,
# -17.50 (per-layer median difference 0.007; one-off, docs/results.md).
_FULL_WIDTH_TAIL = 16


def _solve_layer(D, W_bar, key, init, W_true, stop, *, ranks, steps, schedule,
                 svd, tol, niter, oversample, exact_loss, refine, alternate,
                 batch=1):
  """Spectral DeTuning for one layer given ``D = W'_i - W_bar`` (traceable).

  The state is factored: ``M_i = P_i V_i^T`` (``P_i = U_i diag(S_i)``, rank
  ``q``) and ``W = W_bar - E`` with ``E = mean_i M_i``. A residual
  ``W'_i - W = D_i + E`` is never formed for the ``"subspace"`` method: its
  products with thin matrices are ``D_i X + E X`` with ``E X`` done through
  the factors, so each step touches the dense stack in thin products only:
  one per LoRA (``D_i V_i`` or ``U_i^T D_i``) with ``alternate``, two
  (``D_i V_i`` and ``Q_i^T D_i``) without.
  """
  n, d, k = D.shape
  r_end = max(ranks)
  levels = rank_levels(schedule, r_end)

  def width(level):
    """Columns of the factors while the scheduler's rank is ``level``."""
    return level if svd == "exact" else min(level + oversample, d, k)

  q = width(r_end)
  ranks_arr = jnp.asarray(ranks, jnp.int32)
  exact_loss = exact_loss or svd != "subspace" or tol is not None
  # sum_i ||D_i||^2, summed per slice (no reduction over the stacked axis).
  sum_d2 = stack_sum(jnp.sum(D * D, axis=(1, 2)))
  scale = 1.0 / (n * d * k)
  E0 = None if init is None else W_bar - init.astype(jnp.float32)

  def apply_e(state, X):
    if state is None:
      return 0.0 if E0 is None else jnp.einsum("dk,ikp->idp", E0, X)
    return _lowrank_apply(*state, X)

  def apply_e_t(state, Qx):
    if state is None:
      return 0.0 if E0 is None else jnp.einsum("idp,dk->ipk", Qx, E0)
    return _lowrank_apply_t(*state, Qx)

  def dense_e(state):
    if state is None:
      return jnp.zeros((d, k), jnp.float32) if E0 is None else E0
    P, V = state
    return jnp.einsum("jdq,jkq->dk", P, V) / n

  def m_step(state, V, t, side="both", U_in=None, corr=None, T=None):
    """Returns ``(U [n,d,q], S [n,q], V [n,k,q], <D_i, U_i S_i V_i^T>-helper)``.

    ``side`` (``"subspace"`` only): ``"both"`` takes one block power step
    (``R_i V_i``, then ``Q_i^T R_i``: two passes over the stack);
    ``"right"`` the Rayleigh-Ritz approximation of ``R_i`` in the row space
    of ``V`` from ``R_i V_i`` alone, ``"left"`` the one in the column space
    of the orthonormal ``U_in`` from ``U_in^T R_i`` alone (one pass each);
    ``"left_full"`` is ``"left"`` when every LoRA works at the full width,
    with no SVD (it keeps ``U_in U_in^T R_i`` whole).
    ``corr``: the state's correction already formed by the previous step,
    ``E V_i`` (``"right"``) or ``U_in_i^T E`` (``"left"``); the alternating
    steps, the only callers of those sides, always give it. ``"both"``
    forms its correction here. ``T`` (``"right"``): the ``[n, q, q]``
    transform with ``V_i T_i`` orthonormal (:func:`_lowrank_apply_rows`).
    """
    qw = V.shape[-1]
    if svd == "subspace" and side == "right":
      # The Rayleigh-Ritz step in the row space of V, whose orthonormal basis
      # is X = V T (the left step's V is orthonormal only in its informative
      # columns; the rest are fill). T comes with the state: the left step
      # forms it from the Gram matrices V_i^T V_i of its E V_i product, so
      # no eigh waits here and none runs beside the pass. (Run side by side,
      # XLA:CPU's executor let the single-threaded eigh and the pass compete
      # for the two cores: on the 1280x1280 SD layers both took about 17 ms
      # where the pass alone takes 8 and the eigh 1.) X itself is never
      # formed: R_i X_i = (D_i V_i + E V_i) T_i, so the pass is D_i V_i and
      # the products with T, w are q x q.
      Y = jnp.einsum("ndk,nkq->ndq", D, V)                       # D_i V_i
      Yc = Y + corr                                              # R_i V_i
      # Z_i = R_i X_i = Q_i C_i by Gram-Schmidt (lowrank.gram_schmidt),
      # not from its Gram matrix T^T Yc^T Yc T: the Gram matrix squares the
      # condition number of Z_i, and real fine-tunes' residuals have one
      # direction hundreds of times their rank's last. In float32 those last
      # directions were lost and the solver stalled at a W-Error of about -8
      # on a real MiniLM layer (tests/test_solver.py, the stall fixture).
      Q, C = jax.vmap(lowrank.gram_schmidt)(jnp.einsum("ndp,npq->ndq", Yc, T))
      # C_i = u diag(S) w^T from its Gram matrix C C^T: u is orthonormal, so
      # U = Q u is, and U diag(S) (X w)^T = Q C X^T whatever the rounding of
      # S and w in C's small directions.
      u, S, inv = jax.vmap(lowrank.svd_of_gram)(
          jnp.einsum("npq,nrq->npr", C, C))
      S = jnp.where(inv > 0, S, 0.0)     # as U: the loss counts sum S^2
      U = jnp.einsum("ndp,npq->ndq", Q, u)
      Tw = jnp.einsum("nap,nrp,nrs->nas", T, C, u) * inv[:, None, :]
      V_new = jnp.einsum("nkp,npq->nkq", V, Tw)
      # diag(U_i^T D_i V_new_i) = diag(U_i^T Y_i T_i w_i).
      DV = jnp.einsum("ndp,ndq,nqp->np", U, Y, Tw)
      return U, S, V_new, DV
    if svd == "subspace" and side == "left_full":
      # The left step when every LoRA works at the full width q (the end
      # rank, no oversampling): the M-step keeps all of R_i's projection,
      # M_i = Q_i Q_i^T R_i = Q_i B_i, so no SVD is needed. The factors are
      # U = Q, S_p = ||B_i[p]|| and V_new[:, p] = B_i[p]^T / S_p: unit but not
      # orthogonal columns (the right step's T makes them so), ||M_i||^2 =
      # sum S^2 as Q is orthonormal, and <D_i, M_i> = <Q_i^T D_i, B_i>.
      # Rows of B at zero (directions the residual lacks) take the
      # fill columns, as in lowrank.svd_rows.
      B_d = _left_products(U_in, D, batch)                       # Q_i^T D_i
      B = B_d + corr
      S = jnp.sqrt(jnp.sum(B * B, axis=2))                       # [n, q]
      keep = S > 1e-6 * jnp.max(S, axis=1, keepdims=True)
      inv = jnp.where(keep, 1.0 / jnp.where(keep, S, 1.0), 0.0)
      V_new = jnp.where(keep[:, None, :],
                        jnp.swapaxes(B, 1, 2) * inv[:, None, :],
                        omega[:, :qw])
      DV = jnp.sum(B_d * B, axis=2) * inv
      return U_in, jnp.where(keep, S, 0.0), V_new, DV
    if svd == "subspace":
      if side == "left":
        Q = U_in
      else:
        Y = jnp.einsum("ndk,nkq->ndq", D, V) + apply_e(state, V)
        # Gram-Schmidt, not lowrank.orthonormalize: a basis from Y's Gram
        # matrix loses the residual's small directions (see the right step).
        Q = jax.vmap(lowrank.gram_schmidt)(Y)[0]
      B_d = _left_products(Q, D, batch)                          # Q_i^T D_i
      u, S, V_new = jax.vmap(lowrank.svd_rows, in_axes=(0, None))(
          B_d + (apply_e_t(state, Q) if corr is None else corr),
          omega[:, :qw])
      U = jnp.einsum("ndq,nqp->ndp", Q, u)
      # diag(U_i^T D_i V_i), for <D_i, M_i> of the loss from norms.
      DV = jnp.einsum("nqp,nqk,nkp->np", u, B_d, V_new)
      return U, S, V_new, DV
    R = D + dense_e(state)[None]
    if svd == "randomized":
      kt = jax.random.fold_in(key, t)
      U, S, V_new = jax.vmap(
          lambda a: lowrank.svd_randomized(a, qw, kt, niter))(R)
    else:
      U, S, V_new = jax.vmap(lambda a: lowrank.svd_exact(a, qw))(R)
    return U, S, V_new, None

  def loss_of(P, V, S_m, DV, E):
    if exact_loss:
      # Eq. 3 on dense residuals, one LoRA at a time.
      per = [jnp.sum(jnp.square(D[i] + E - P[i] @ V[i].T)) for i in range(n)]
      return functools.reduce(jnp.add, per) * scale
    # Eq. 3 from norms: sum_i ||D_i + E - M_i||^2
    #   = sum_i ||D_i||^2 - 2 <D_i, M_i> + ||M_i||^2  - n ||E||^2,
    # using sum_i D_i = 0 and sum_i M_i = n E. Exact up to float32 rounding
    # of sum_i ||D_i||^2 (about 1e-7 of it): far below every loss the
    # scheduler acts on (it only acts while some LoRA is below its end rank).
    # ||M_i||^2 and ||E||^2 from the Gram matrices of the factors (V is
    # orthonormal only to rounding, so its Gram matrix is used, not 1).
    G_pv = (jnp.einsum("idp,jdq->ijpq", P, P)
            * jnp.einsum("ikp,jkq->ijpq", V, V))
    e2 = jnp.sum(G_pv) / (n * n)
    m2 = jnp.sum(jnp.diagonal(G_pv, axis1=0, axis2=1))
    total = sum_d2 - 2.0 * jnp.sum(S_m * DV) + m2 - n * e2
    return jnp.maximum(total, 0.0) * scale

  def loss_of_products(S_m, DV, em):
    """Eq. 3 from norms as :func:`loss_of`, with no ``n x n`` Gram matrices:
    ``n ||E||^2 = sum_i <E, M_i>`` from ``em[i] = <E, M_i>``, read off a
    product with ``E`` that the next step needs anyway, and ``||M_i||^2 =
    sum S_m^2`` (the alternating steps' factors are orthonormal to rounding:
    a relative error of about 1e-6 of ``||M_i||^2``, far below the losses
    the scheduler acts on)."""
    total = sum_d2 - 2.0 * jnp.sum(S_m * DV) + jnp.sum(S_m * S_m) - jnp.sum(em)
    return jnp.maximum(total, 0.0) * scale

  def step(t, state, V, sched, side="both", U_in=None, corr=None, T=None):
    """One M-step and W-step. Returns ``(cur, (P, V), loss, w_err, U,
    nxt)``; ``nxt`` (alternating steps only): the new state's correction
    the next step takes as ``corr`` (``U_i^T E`` after a right step, whose
    ``U`` the left step uses; ``(E V_i, T_i)`` after a left step, with the
    ``T`` the right step takes)."""
    cur = jnp.minimum(sched.rank, ranks_arr)                      # [n]
    U, S, V_new, DV = m_step(state, V, t, side, U_in, corr, T)
    cols = jnp.arange(V_new.shape[-1])
    S_m = jnp.where(cols[None, :] < cur[:, None], S, 0.0)
    P = U * S_m[:, None, :]
    E = dense_e((P, V_new)) if (exact_loss or W_true is not None) else None
    nxt = None
    if side == "right":
      nxt = _lowrank_apply_t(P, V_new, U)                        # U_i^T E
      em = jnp.einsum("ip,ipk,ikp->i", S_m, nxt, V_new)
    elif side in ("left", "left_full"):
      nxt = _lowrank_apply_rows(P, V_new)                        # E V_i, T_i
      em = jnp.einsum("idp,idp->i", nxt[0], P)
    if nxt is None or exact_loss:
      loss = loss_of(P, V_new, S_m, DV, E)
    else:
      loss = loss_of_products(S_m, DV, em)
    w_err = None
    if W_true is not None:
      w_err = _log10_mse(_compose(W_bar, mean_d, E), W_true)
    return cur, (P, V_new), loss, w_err, U, nxt

  # mean_i D_i (the rounding error of W_bar): recomputed where needed, so no
  # dense [d, k] buffer is held through the loop.
  mean_d = stack_mean(D) if W_true is not None else None

  # Starting right subspace: a randomized range finder (niter power
  # iterations) on the residuals of the initial W. One Gaussian sketch for
  # every LoRA keeps the result independent of their order; its later
  # columns widen the subspace when the working rank grows.
  omega = jnp.linalg.qr(jax.random.normal(key, (k, q), jnp.float32))[0]
  q0 = width(rank_phases(levels)[0][1])
  V = jnp.broadcast_to(omega[:, :q0], (n, k, q0))
  if svd == "subspace":
    for _ in range(niter + 1):
      Y = jnp.einsum("ndk,nkq->ndq", D, V) + apply_e(None, V)
      Qy = jnp.linalg.qr(Y)[0]
      Z = _left_products(Qy, D, batch) + apply_e_t(None, Qy)
      V = jnp.linalg.qr(jnp.swapaxes(Z, 1, 2))[0]

  trace = W_true is not None
  sched0 = rank_schedule_init(schedule, r_end)
  loss_tr = jnp.full((steps,), jnp.nan, jnp.float32)
  rank_tr = jnp.zeros((steps, n), jnp.int32)
  werr_tr = jnp.full((steps,), jnp.nan, jnp.float32) if trace else None
  if E0 is None:
    # E = 0 is the factored state with P = 0: every step runs in the loop.
    c = (jnp.asarray(0, jnp.int32), (jnp.zeros((n, d, q0), jnp.float32), V),
         sched0, loss_tr, rank_tr, werr_tr, jnp.asarray(jnp.nan, jnp.float32),
         jnp.asarray(False))
  else:
    # Step 0 is taken outside the loop: its residuals use the dense initial
    # E, every later step the factored one.
    cur0, fac0, loss0, werr0, _, _ = step(0, None, V, sched0)
    sched1 = rank_schedule_step(schedule, sched0, loss0, 1, r_end, steps)
    if trace:
      werr_tr = werr_tr.at[0].set(werr0)
    c = (jnp.asarray(1, jnp.int32), fac0, sched1, loss_tr.at[0].set(loss0),
         rank_tr.at[0].set(cur0), werr_tr, loss0, jnp.asarray(False))

  def converged(cur, prev_loss, loss):
    if tol is None:
      return jnp.asarray(False)
    return jnp.all(cur == ranks_arr) & (prev_loss - loss <= tol * prev_loss)

  def body(c):
    t, fac, sched, loss_tr, rank_tr, werr_tr, prev_loss, _ = c
    cur, fac_new, loss, w_err, _, _ = step(t, fac, fac[1], sched)
    sched = rank_schedule_step(schedule, sched, loss, t + 1, r_end, steps)
    done = converged(cur, prev_loss, loss)
    if trace:
      werr_tr = werr_tr.at[t].set(w_err)
    return (t + 1, fac_new, sched, loss_tr.at[t].set(loss),
            rank_tr.at[t].set(cur), werr_tr, loss, done)

  def body_alternating(c, bound, last_phase, left="left"):
    """Two steps, each one pass over the stack: right, then left.

    The right step's orthonormal left basis ``U`` seeds the left step, whose
    new row space ``V`` seeds the next right step: together one block power
    iteration, with an M-step and a W-step after each half. The second step
    is kept only if it is due (``stop``, ``tol``, still in this phase);
    otherwise its work is discarded and the loop continues from the first.

    The carry's factors are ``(P, V, E V_i, T_i)``: each step forms the
    product of its new ``E`` that the next step needs (and reads ``n
    ||E||^2`` of its loss off it); the left step also the transform ``T_i``
    that makes ``V_i`` orthonormal for the right step. A discarded second
    step ends the phase's loop for that layer (``stop``, ``tol`` or the
    phase's bound), so its ``E V_i`` and ``T_i`` are kept whatever ``ok``
    says: the next phase forms its own.
    """
    t, (P, V, EV, T), sched, loss_tr, rank_tr, werr_tr, prev_loss, _ = c
    cur1, fac1, loss1, werr1, U1, UtE = step(t, (P, V), V, sched, "right",
                                             corr=EV, T=T)
    sched1 = rank_schedule_step(schedule, sched, loss1, t + 1, r_end, steps)
    done1 = converged(cur1, prev_loss, loss1)
    cur2, fac2, loss2, werr2, _, nxt2 = step(t + 1, fac1, fac1[1], sched1,
                                             left, U1, corr=UtE)
    sched2 = rank_schedule_step(schedule, sched1, loss2, t + 2, r_end, steps)
    done2 = converged(cur2, loss1, loss2)
    ok = (t + 1 < stop) & ~done1
    if not last_phase:
      ok = ok & (sched1.rank <= bound)
    pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(ok, x, y), a, b)
    t2 = jnp.minimum(t + 1, steps - 1)
    loss_tr = loss_tr.at[t].set(loss1)
    loss_tr = loss_tr.at[t2].set(jnp.where(ok, loss2, loss_tr[t2]))
    rank_tr = rank_tr.at[t].set(cur1)
    rank_tr = rank_tr.at[t2].set(jnp.where(ok, cur2, rank_tr[t2]))
    if trace:
      werr_tr = werr_tr.at[t].set(werr1)
      werr_tr = werr_tr.at[t2].set(jnp.where(ok, werr2, werr_tr[t2]))
    return (jnp.where(ok, t + 2, t + 1), pick(fac2, fac1) + nxt2,
            pick(sched2, sched1), loss_tr, rank_tr, werr_tr,
            jnp.where(ok, loss2, loss1), jnp.where(ok, done2, done1))

  # One while_loop per phase of the scheduler's rank, each with factors of
  # a static width that covers the phase's levels (see rank_phases): the
  # products with the stack cost about what the working rank needs, not
  # the end rank. A phase's loop runs while the scheduler's rank is within
  # it; the last one runs to the end whatever the rank. Under vmap each
  # layer keeps its own trajectory (layers in another phase are frozen by
  # the batched loop), so batches equal per-layer calls.
  phases = rank_phases(levels)
  alternating = svd == "subspace" and alternate
  # Once the scheduler is at the end rank and every LoRA works at the full
  # width of the last phase, the left step needs no SVD (see m_step's
  # "left_full"): the last phase's loop is split there, and again before the
  # last _FULL_WIDTH_TAIL steps, which take the SVD left step. Short runs
  # (the Mistral bench's 30 steps) keep one loop: the split would run few
  # steps or none, and its program costs memory (about 13 MiB there).
  full_width = (alternating and len(set(ranks)) == 1 and width(r_end) == r_end
                and steps >= 4 * _FULL_WIDTH_TAIL)
  # A run of one step from an initial W (auto's polishing step) is step 0
  # alone: no loop is compiled (the program compiles in about half the
  # time, and the loops would not run).
  if E0 is not None and steps == 1:
    phases = []
  for j, (bound, wlevel) in enumerate(phases):
    last_phase = j == len(phases) - 1
    P, V = c[1][:2]
    qa, qb = P.shape[-1], width(wlevel)
    if qb > qa:
      P = jnp.concatenate([P, jnp.zeros((n, d, qb - qa), P.dtype)], -1)
      V = jnp.concatenate(
          [V, jnp.broadcast_to(omega[:, qa:qb], (n, k, qb - qa))], -1)
    fac = (P, V) + _lowrank_apply_rows(P, V) if alternating else (P, V)
    c = c[:1] + (fac,) + c[2:]

    def cond(c, bound=bound, last_phase=last_phase):
      go = (c[0] < stop) & ~c[-1]
      return go if last_phase else go & (c[2].rank <= bound)

    if alternating:
      loop_body = functools.partial(body_alternating, bound=bound,
                                    last_phase=last_phase)
    else:
      loop_body = body
    if last_phase and full_width:
      c = jax.lax.while_loop(lambda c: cond(c) & (c[2].rank < r_end),
                             loop_body, c)
      c = jax.lax.while_loop(
          lambda c: cond(c) & (c[0] < stop - _FULL_WIDTH_TAIL),
          functools.partial(loop_body, left="left_full"), c)
    c = jax.lax.while_loop(cond, loop_body, c)
  t, (P, V, *_), _, loss_tr, rank_tr, werr_tr, loss, _ = c
  factors, res2 = _refine(D, P, V, refine, batch)
  W = _compose_blocks(W_bar, D, factors, batch)
  last = t - 1
  if not exact_loss:
    # The trace's values below ~1e-7 of sum_i ||D_i||^2 / (n d k) are float32
    # noise of the norm formula; the final loss is computed on the residuals
    # (those of the factored state, before the refinement).
    loss = res2 * scale
    loss_tr = loss_tr.at[last].set(loss)
  if trace:
    werr_tr = werr_tr.at[last].set(_log10_mse(W, W_true))
  return W, Diagnostics(loss=loss_tr, rank=rank_tr, steps=t,
                        final_rank=rank_tr[last], final_loss=loss,
                        w_error=werr_tr)


# Elements of the stack per block of rows of the refinement (about 8 MiB of
# float32 per [n, rows, k] block): no dense [d, k] or [n, d, k] buffer is
# formed besides the stack.
_REFINE_BLOCK_ELEMS = 1 << 21
_REFINE_MIN_ROW_ELEMS = 1 << 17


def _row_blocks(n: int, d: int, k: int, batch: int = 1):
  """``(rows, full_blocks, rest)``: ``[n, d, k]`` split into row blocks
  (sized for ``batch`` such stacks solved together under vmap)."""
  rows = _REFINE_BLOCK_ELEMS // max(batch * n * k, 1)
  # Not below _REFINE_MIN_ROW_ELEMS per [rows, k] slice: smaller batched
  # products run far below the machine's speed.
  rows = max(1, min(d, max(rows, -(-_REFINE_MIN_ROW_ELEMS // k))))
  return rows, d // rows, d % rows


def _for_row_blocks(n, d, k, block, carry, batch=1, first=0):
  """``carry = block(r0, size, carry)`` over the row blocks of a stack,
  from block ``first`` on (a caller that took block 0 itself passes 1)."""
  rows, full, rest = _row_blocks(n, d, k, batch)
  if first == 0 and full == 1 and rest == 0:
    return block(0, d, carry)
  carry = jax.lax.fori_loop(
      first, full, lambda b, c: block(b * rows, rows, c), carry)
  if rest:
    carry = block(full * rows, rest, carry)
  return carry


def _factor_rows(U, K, L, V, r0, size):
  """Rows ``r0:r0+size`` of every ``M_i = U_i K_i + L_i V_i^T`` and of
  ``E = mean_i M_i`` (``[n, size, k]``, ``[size, k]``); ``L = None`` is 0."""
  n = U.shape[0]
  Ub = jax.lax.dynamic_slice_in_dim(U, r0, size, axis=1)
  Mb = jnp.einsum("nrq,nqk->nrk", Ub, K)
  if L is not None:
    Lb = jax.lax.dynamic_slice_in_dim(L, r0, size, axis=1)
    Mb = Mb + jnp.einsum("nrq,nkq->nrk", Lb, V)
  # The mean of the M_i as a chain of adds: measured on 4 ViT layers
  # (768x768, n=5, r=16) it gives a better recovery (-19.60, 85.1% of the
  # weights bit-exact) than one product of the stacked factors (-19.45,
  # 83.4%), and it needs no transposed copy of the factors.
  Eb = stack_sum(Mb) / n
  return Mb, Eb


def _sweep(D, U, K, L, V, B=None, update: bool = True, batch: int = 1):
  """One Jacobi sweep of the refinement, a block of rows at a time.

  For every LoRA the residual ``N_i = D_i + E - M_i`` (``E`` and the
  ``M_i`` of the state before the sweep) is formed block by block, at its
  own small scale, and dropped after its thin products. Returns ``(A, B,
  sum_i ||N_i||^2)`` with ``A_i = U_i^T N_i`` ``[n, q, k]`` and ``B_i = N_i
  V_i`` ``[n, d, q]`` (``None`` unless ``update``); ``B`` may pass in a
  dead ``[n, d, q]`` buffer to write into. ``A`` is the first block's
  product, then accumulated one LoRA at a time in place: no zero-filled or
  second ``[n, q, k]`` buffer.
  """
  n, d, k = D.shape

  def block(r0, size, carry):
    A, B, r2 = carry
    Mb, Eb = _factor_rows(U, K, L, V, r0, size)
    N = jax.lax.dynamic_slice_in_dim(D, r0, size, axis=1) + Eb[None] - Mb
    r2 = r2 + stack_sum(jnp.sum(N * N, axis=(1, 2)))
    if update:
      Ub = jax.lax.dynamic_slice_in_dim(U, r0, size, axis=1)
      if A is None or batch > 1:
        # Batched, the in-place update of _add_at would be a scatter.
        dA = jnp.einsum("nrq,nrk->nqk", Ub, N)
        A = dA if A is None else A + dA
      else:
        A = jax.lax.fori_loop(
            0, n, lambda i, A: _add_at(A, i, Ub[i].T @ N[i]), A)
      B = jax.lax.dynamic_update_slice_in_dim(
          B, jnp.einsum("nrk,nkq->nrq", N, V), r0, axis=1)
    return A, B, r2

  if update and B is None:
    B = jnp.zeros(U.shape, jnp.float32)
  rows = _row_blocks(n, d, k, batch)[0]
  carry = block(0, rows, (None, B if update else None,
                          jnp.zeros((), jnp.float32)))
  return _for_row_blocks(n, d, k, block, carry, batch, first=1)


def _refine(D, P, V, iters, batch: int = 1):
  """Float32 iterative refinement of the converged M-step and W-step.

  In float32 the M-step's products (sums over ``k`` terms) carry relative
  errors of a few ``1e-7``, i.e. errors of about one ulp of ``W`` in ``E =
  mean_i M_i``, so a converged solver stalls with half of the entries of
  ``W`` off by an ulp or more. Each refinement iteration forms the residual
  ``N_i = D_i + E - M_i`` (small, so rounded at its own small scale),
  corrects ``M_i`` by ``P_T(N_i)``, the projection onto the tangent space
  of the rank-``r`` matrices at ``M_i`` (the first-order change of the
  truncated SVD: ``U U^T N + N V V^T - U U^T N V V^T``) and recomputes ``E``.
  The corrected ``M_i = U_i K_i + L_i V_i^T`` are kept as thin factors and
  the residuals are formed a block of rows at a time (a Jacobi sweep: every
  LoRA is corrected against the ``E`` of the previous iteration), so no
  dense ``[d, k]`` buffer is needed: ``E`` is formed block by block from
  the factors, here and in :func:`_compose_blocks`. Cost per iteration:
  about three steps of the solver.

  Args:
    D: ``[n, d, k]`` deviations ``W'_i - W_bar``.
    P, V: ``[n, d, q]``, ``[n, k, q]`` factors ``M_i = P_i V_i^T``
      (zero columns of ``P`` are inactive).
    iters: number of refinement iterations (static; 0 only measures).
    batch: layers solved together under vmap (sizes the row blocks).

  Returns:
    ``((U, K, L, V), res2)``: the refined factors, ``M_i = U_i K_i + L_i
    V_i^T`` (``L = None`` for 0), and ``sum_i ||D_i + E - M_i||^2`` of the
    state before the refinement.
  """
  active = jnp.sum(P * P, axis=1) > 0                                # [n, q]
  U = jax.vmap(lowrank.range_basis)(P)
  # M_i = P_i V_i^T = U_i K_i with K_i = (U_i^T P_i) V_i^T; L_i = 0.
  K = jnp.einsum("ndq,ndp,nkp->nqk", U, P, V)
  V = jax.vmap(lowrank.range_basis)(lowrank.after(V * active[:, None, :], U))
  L = B = None
  res2 = None
  for _ in range(iters):
    # B of the previous iteration is dead: its buffer takes the new one.
    A, B, r2 = _sweep(D, U, K, L, V, B, batch=batch)
    res2 = r2 if res2 is None else res2
    # M_i + P_T(N_i) = U_i (K_i + A_i) + (L_i + B_i - U_i A_i V_i) V_i^T.
    dL = B - jnp.einsum("ndq,nqp->ndp", U, jnp.einsum("nqk,nkp->nqp", A, V))
    L = dL if L is None else L + dL
    K = K + A
  if res2 is None:
    res2 = _sweep(D, U, K, L, V, update=False, batch=batch)[2]
  return (U, K, L, V), res2


def _compose_blocks(W_bar, D, factors, batch: int = 1):
  """``W = W_bar + (mean_i D_i - E)``, written over ``W_bar`` by row blocks.

  ``E = mean_i M_i`` from the refined factors; see :func:`_compose` for the
  order of the additions (one rounding at the scale of ``W``).
  """
  U, K, L, V = factors
  n, d, k = D.shape

  def block(r0, size, W):
    _, Eb = _factor_rows(U, K, L, V, r0, size)
    mean_d = stack_mean(jax.lax.dynamic_slice_in_dim(D, r0, size, axis=1))
    Wb = jax.lax.dynamic_slice_in_dim(W, r0, size, axis=0)
    return jax.lax.dynamic_update_slice_in_dim(
        W, _compose(Wb, mean_d, Eb), r0, axis=0)

  return _for_row_blocks(n, d, k, block, W_bar, batch)


def rank_levels(schedule: RankSchedule, end_rank: int) -> tuple[int, ...]:
  """The working ranks the scheduler can take, in order (static).

  ``start_rank``, then repeated multiplication by ``factor`` capped at
  ``end_rank``; ``(end_rank,)`` for the fixed schedule. The solver runs one
  loop per level; a rank outside this list (e.g. a fractional ``factor``)
  is handled by the last loop, which works at the end rank.

  >>> rank_levels(RankSchedule(), 16)
  (1, 2, 4, 8, 16)
  """
  if schedule.kind != "plateau":
    return (end_rank,)
  level = max(1, min(int(schedule.start_rank), end_rank))
  levels = [level]
  factor = schedule.factor
  while level < end_rank and isinstance(factor, (int, np.integer)) and factor > 1:
    level = min(level * int(factor), end_rank)
    levels.append(level)
  if levels[-1] != end_rank:
    levels.append(end_rank)
  return tuple(levels)


def rank_phases(levels: tuple[int, ...], spread: int = 4):
  """Groups the scheduler's levels into phases of one static width each.

  A loop per level would compile one copy of the step per level; instead
  the widths are ``end``, ``ceil(end / spread)``, ``ceil(end / spread^2)``,
  ... (down to the first level) and each level runs at the smallest width
  that holds it (the extra columns oversample the subspace iteration).

  Args:
    levels: from :func:`rank_levels` (ascending, last = end rank).
    spread: ratio between consecutive widths.

  Returns:
    ``((bound, width), ...)``: phase ``j`` runs while the rank is at most
    ``bound`` with factors of ``width`` columns (before oversampling).

  >>> rank_phases((1, 2, 4, 8, 16))
  ((1, 1), (4, 4), (16, 16))
  """
  widths = [levels[-1]]
  while widths[-1] > levels[0]:
    widths.append(max(-(-widths[-1] // spread), levels[0]))
  widths = sorted(set(widths))
  phases = []
  for level in levels:
    w = min(x for x in widths if x >= level)
    if phases and phases[-1][1] == w:
      phases[-1] = (level, w)
    else:
      phases.append((level, w))
  return tuple(phases)


def _compose(W_bar, mean_d, E):
  """``W = mean_i (W'_i - M_i)`` with a single rounding at the scale of ``W``.

  ``W_bar`` is the float32-rounded mean of the ``W'_i`` and ``mean_d =
  mean_i (W'_i - W_bar)`` its rounding error (the ``D_i`` are exact or
  rounded at their own, much smaller scale), so ``W_bar + mean_d`` is the
  unrounded mean as an unevaluated sum ``hi + lo``. Adding the two small
  terms first, ``(mean_d - E)``, and ``W_bar`` last rounds once where the
  naive ``W_bar - E + mean_d`` rounds twice at the scale of ``W``: on
  float32 synthetic data most entries of the recovery come out bit-exact.
  XLA:CPU does not reassociate float additions (no fast-math), which
  ``tests/test_lowrank.py`` checks.
  """
  return W_bar + (mean_d - E)


def _log10_mse(W, W_true):
  return jnp.log10(jnp.maximum(jnp.mean(jnp.square(W - W_true)), 1e-30))


# W_bar (made by _center for this call) is donated: W is written over it.
@functools.partial(jax.jit, static_argnames=(
    "ranks", "steps", "schedule", "svd", "tol", "niter", "oversample",
    "exact_loss", "refine", "alternate"), donate_argnames=("W_bar",))
def _solve(D, W_bar, key, init, W_true, stop, *, ranks, steps, schedule, svd,
           tol, niter, oversample, exact_loss, refine, alternate):
  fn = functools.partial(_solve_layer, ranks=ranks, steps=steps,
                         schedule=schedule, svd=svd, tol=tol, niter=niter,
                         oversample=oversample, exact_loss=exact_loss,
                         refine=refine, alternate=alternate)
  if D.ndim == 4 and D.shape[0] == 1:
    # One layer: solved without vmap. Batched, the in-place accumulations
    # (dynamic_update_slice) become scatters that XLA:CPU writes into a new
    # buffer each time (12 MiB more on the Mistral-shaped layer).
    first = lambda x: None if x is None else x[0]
    W, diag = fn(D[0], W_bar[0], key, first(init), first(W_true), stop)
    return jax.tree.map(lambda x: x[None], (W, diag))
  if D.ndim == 4:
    # Blocks of rows are sized for all the layers of the batch.
    fn = functools.partial(fn, batch=D.shape[0])
    return jax.vmap(fn, in_axes=(0, 0, None, None if init is None else 0,
                                 None if W_true is None else 0, None))(
                                     D, W_bar, key, init, W_true, stop)
  return fn(D, W_bar, key, init, W_true, stop)


def spectral_detuning(W_primes, rank: Rank, steps: int = 300, *,
                      schedule: RankSchedule = RankSchedule(),
                      svd: str = "subspace",
                      tol: Optional[float] = None,
                      seed: int = 0,
                      init=None,
                      niter: int = 2,
                      oversample: int = 0,
                      exact_loss: bool = False,
                      donate_input: bool = False,
                      W_true=None,
                      refine: int = 2,
                      stop_after: Optional[int] = None,
                      alternate: bool = True):
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
    exact_loss: compute the per-step loss on dense residuals (costs about one
      more pass over the stack per step). By default the ``"subspace"``
      method computes Eq. 3 from norms of the factors, which is exact up to
      float32 rounding of ``sum_i ||W'_i - mean W'||^2`` (about 1e-7 of it;
      smaller trace values are noise). The scheduler only acts on losses far
      above that, and ``final_loss`` is always exact. Forced on by ``tol``
      and by the ``"exact"``/``"randomized"`` methods.
    donate_input: let the solver reuse the buffer of ``W_primes`` (a float32
      ``jax.Array``, deleted afterwards) instead of holding a second copy of
      the stack. Inputs that are converted (numpy arrays, other dtypes) are
      always solved in their converted copy.
    W_true: optional ground truth (``[d, k]`` or ``[L, d, k]``): records the
      per-step W-Error in ``diagnostics.w_error`` (evaluation only; costs one
      dense product per step).
    refine: float32 iterative-refinement iterations of the converged state
      before ``W`` is returned (each costs about three steps): corrects the
      M-step's rounding errors to first order, so the recovery is limited by
      the rounding of the inputs, not by the solver's float32 arithmetic
      (on float32 synthetic data most entries come out bit-exact). ``0``
      returns the plain last W-step.
    stop_after: take at most this many steps of the ``steps``-step run (the
      scheduler keeps the timetable of ``steps``; the refinement still runs).
      For time-to-accuracy measurements; not compiled in (no recompilation).
    alternate: ``"subspace"`` only. ``True`` (default): steps alternate
      between a right and a left one-sided M-step (the Rayleigh-Ritz
      approximation of each residual in its current row space from
      ``R_i V_i``, then in the new column space from ``U_i^T R_i``), each one
      pass over the stack; two steps make one block power iteration.
      ``False``: every step takes both products (two passes). Same final
      W-Error; the alternating steps cost about half (768x768, n=5, r=16:
      1.44 s against 2.51 s for 300 steps, ``experiments.bench_solver``).

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
  owned = not isinstance(W_primes, jax.Array)
  W_primes = check_stack(W_primes)
  statics = _static_options(
      W_primes.shape, rank, steps, schedule=schedule, svd=svd, tol=tol,
      niter=niter, oversample=oversample, exact_loss=exact_loss,
      refine=refine, alternate=alternate)
  d, k = W_primes.shape[-2:]
  if init is not None:
    init = jnp.asarray(init, jnp.float32)
    if init.shape != W_primes.shape[:-3] + (d, k):
      raise ValueError(f"init has shape {tuple(init.shape)}, expected "
                       f"{W_primes.shape[:-3] + (d, k)}")
  if W_true is not None:
    W_true = jnp.asarray(W_true, jnp.float32)
    if W_true.shape != W_primes.shape[:-3] + (d, k):
      raise ValueError(f"W_true has shape {tuple(W_true.shape)}, expected "
                       f"{W_primes.shape[:-3] + (d, k)}")
  owned = owned or W_primes.dtype != jnp.float32
  W_primes = W_primes.astype(jnp.float32)
  D, W_bar = _center(W_primes, donate=owned or donate_input)
  del W_primes
  stop = jnp.asarray(steps if stop_after is None
                     else max(1, min(int(stop_after), int(steps))), jnp.int32)
  return programs.call(_solve, "spectral_detuning",
                       (D, W_bar, jax.random.key(seed), init, W_true, stop),
                       statics, donate=(1,))


def _static_options(shape, rank, steps, *, schedule, svd, tol, niter,
                    oversample, exact_loss, refine, alternate) -> dict:
  """Checks a call's arguments; returns the static arguments of ``_solve``."""
  n, d, k = shape[-3:]
  if n < 2:
    raise ValueError(f"need at least 2 fine-tuned matrices, got {n}")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if svd not in lowrank.SVD_METHODS:
    raise ValueError(f"unknown svd method {svd!r}; expected one of "
                     f"{lowrank.SVD_METHODS}")
  return dict(ranks=normalize_ranks(rank, n, d, k), steps=int(steps),
              schedule=schedule, svd=svd,
              tol=None if tol is None else float(tol), niter=int(niter),
              oversample=int(oversample), exact_loss=bool(exact_loss),
              refine=int(refine), alternate=bool(alternate))


def precompile(shape: Sequence[int], rank: Rank, steps: int = 300, *,
               schedule: RankSchedule = RankSchedule(),
               svd: str = "subspace",
               tol: Optional[float] = None,
               seed: int = 0,
               niter: int = 2,
               oversample: int = 0,
               exact_loss: bool = False,
               refine: int = 2,
               alternate: bool = True,
               trim: bool = True) -> dict:
  """Compiles :func:`spectral_detuning` for a stack shape before it exists.

  A later ``spectral_detuning`` call on a float32 stack of ``shape`` with
  the same options (and no ``init``/``W_true``) reuses the compiled
  programs. XLA's compiler takes a few hundred MiB of heap for the larger
  programs and glibc keeps it after the compile: compiling here, before the
  stack is read, and trimming the heap afterwards (``trim``, see
  :mod:`detune_jax.memory`) keeps that memory out of the solve's peak. On
  the Mistral-shaped layer (12 x 4096 x 4096) the peak above the imports
  is 1.48x the stack with it (``docs/results.md``).

  Args:
    shape: ``(n, d, k)`` or ``(L, n, d, k)``.
    rank, steps, schedule, svd, tol, seed, niter, oversample, exact_loss,
      refine, alternate: as for :func:`spectral_detuning`.
    trim: give the compiler's freed heap back to the OS afterwards.

  Returns:
    XLA's memory analysis of the solver program, in bytes:
    ``argument_bytes`` (the centred stack and its mean), ``output_bytes``,
    ``alias_bytes`` (the output written over the mean) and ``temp_bytes``
    (everything else the program allocates while it runs).
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) not in (3, 4):
    raise ValueError(f"shape must be (n, d, k) or (L, n, d, k), got {shape}")
  statics = _static_options(
      shape, rank, steps, schedule=schedule, svd=svd, tol=tol, niter=niter,
      oversample=oversample, exact_loss=exact_loss, refine=refine,
      alternate=alternate)
  stack = jax.ShapeDtypeStruct(shape, jnp.float32)
  mean = jax.ShapeDtypeStruct(shape[:-3] + shape[-2:], jnp.float32)
  _mean_jit.lower(stack).compile()
  for sub in (_subtract_jit, _subtract_donating):
    sub.lower(stack, mean).compile()
  stop = jax.ShapeDtypeStruct((), jnp.int32)
  key = jax.ShapeDtypeStruct((), jax.random.key(seed).dtype)
  compiled = programs.lower(_solve, "spectral_detuning",
                            (stack, mean, key, None, None, stop), statics,
                            donate=(1,)).compile()
  analysis = compiled.memory_analysis()
  if trim:
    memory.trim_heap()
  return {name: int(getattr(analysis, f"{name[:-6]}_size_in_bytes", 0) or 0)
          for name in ("argument_bytes", "output_bytes", "alias_bytes",
                       "temp_bytes")}
