"""Spectral DeTuning (Horwitz et al. 2024, Alg. 1-2) in pure JAX.

Solves, for one layer, ``min_{W, M_i} sum_i ||W'_i - W - M_i||_F^2`` subject to
``rank(M_i) <= r_i`` by coordinate descent:

* init: ``W = mean_i W'_i`` (or a given ``init``);
* M-step: ``M_i = SVD_{r_i}(W'_i - W)`` at the scheduler's working rank;
* W-step: ``W = mean_i (W'_i - M_i)``;
* the rank scheduler (:mod:`detune_jax.solvers.schedule`) runs inside the
  ``lax.while_loop`` state.

One layer is solved by :func:`_solve_layer` in four parts: :func:`_prepare`
gathers the arrays every step reads (a :class:`_Layer`), :func:`_init_state`
builds the loop carry (a :class:`_SolverState`), :func:`_run` owns the
``lax.while_loop``s (one per phase of the scheduler's rank, with
:func:`_plain_loop_step` or :func:`_alternating_steps` as body) and
:func:`_finish` refines the last state and writes the diagnostics. Each
M-step variant is a function of its own, ``_m_step_*``, picked while
tracing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from detune_jax import memory, programs
from detune_jax.solvers import lowrank
from detune_jax.solvers.schedule import (RankSchedule, RankScheduleState,
                                         rank_schedule_init,
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
# one applies, because the full-width steps' states sit at a slightly higher
# float32 noise floor (24 real MiniLM layers, n=5, r=16: mean final W-Error
# -17.37 against -17.50 with every step's SVD, and -17.50 with these 16
# steps at the end; a one-off script, ``git show 328b8e0:docs/results.md``,
# the section on "a cheaper right step, and no SVD in the left step at the
# end rank").
_FULL_WIDTH_TAIL = 16


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static options of one layer's solve (see :func:`spectral_detuning`).

  ``exact_loss`` is already forced on where the loss from norms does not
  apply (``tol``, the dense SVD methods); ``batch`` is the number of layers
  solved together under vmap, which sizes the blocks of rows.
  """
  n: int
  d: int
  k: int
  ranks: tuple[int, ...]
  steps: int
  schedule: RankSchedule
  svd: str
  tol: Optional[float]
  niter: int
  oversample: int
  exact_loss: bool
  refine: int
  alternate: bool
  batch: int = 1

  @property
  def end_rank(self) -> int:
    return max(self.ranks)

  @property
  def scale(self) -> float:
    """Turns a sum of squared residuals into the loss of Eq. 3."""
    return 1.0 / (self.n * self.d * self.k)

  @property
  def alternating(self) -> bool:
    """Whether steps alternate between a right and a left one-sided M-step."""
    return self.svd == "subspace" and self.alternate

  @property
  def phases(self) -> tuple[tuple[int, int], ...]:
    """``((bound, level), ...)`` of :func:`rank_phases`: one loop each."""
    return rank_phases(rank_levels(self.schedule, self.end_rank))

  def width(self, level: int) -> int:
    """Columns of the factors while the scheduler's rank is ``level``."""
    if self.svd == "exact":
      return level
    return min(level + self.oversample, self.d, self.k)


class _Layer(NamedTuple):
  """One layer's arrays, as every step reads them (see :func:`_prepare`)."""
  D: jax.Array                  # [n, d, k] deviations W'_i - W_bar
  W_bar: jax.Array              # [d, k] float32 mean of the W'_i
  key: jax.Array                # seed of the sketches
  end_ranks: jax.Array          # [n] int32 rank of each LoRA
  sum_d2: jax.Array             # sum_i ||D_i||^2
  E0: Optional[jax.Array]       # W_bar - init; None where init is W_bar
  W_true: Optional[jax.Array]   # [d, k] ground truth, for the W-Error trace
  mean_d: Optional[jax.Array]   # [d, k] mean_i D_i, only with W_true
  omega: jax.Array              # [k, q] orthonormal Gaussian sketch


class _SolverState(NamedTuple):
  """Carry of the solver's ``lax.while_loop``s.

  The state is factored: ``M_i = P_i V_i^T`` and ``W = W_bar - E`` with
  ``E = mean_i M_i``. ``EV`` and ``T`` are carried by the alternating steps
  only (``None`` otherwise): each left step forms them for the next right
  step.
  """
  step: jax.Array                       # int32 steps taken
  P: jax.Array                          # [n, d, q] P_i = U_i diag(S_i)
  V: jax.Array                          # [n, k, q]
  EV: Optional[jax.Array]               # [n, d, q] E V_i
  T: Optional[jax.Array]                # [n, q, q], V_i T_i orthonormal
  sched: RankScheduleState
  loss_trace: jax.Array                 # [steps] float32, nan when not taken
  rank_trace: jax.Array                 # [steps, n] int32, 0 when not taken
  w_error_trace: Optional[jax.Array]    # [steps] float32, only with W_true
  loss: jax.Array                       # loss of the last step taken
  done: jax.Array                       # bool: ``tol`` met


class _Step(NamedTuple):
  """What one M-step and W-step produced."""
  rank: jax.Array                   # [n] int32 working rank of each LoRA
  P: jax.Array                      # [n, d, q] new factors, M_i = P_i V_i^T
  V: jax.Array                      # [n, k, q]
  loss: jax.Array                   # loss of Eq. 3 after the step
  w_error: Optional[jax.Array]      # log10 MSE(W - W_true), only with W_true


# E = mean_i M_i, the shift of W from W_bar, takes one of three forms: None
# (zero: the solve starts from the mean), a dense [d, k] array (the start
# from ``init``) or the factors (P, V) of the M_i (every later step).

def _e_times(E, X):
  """``E @ X_i`` for every i; ``X``: ``[n, k, p]``."""
  if E is None:
    return 0.0
  if isinstance(E, tuple):
    return _lowrank_apply(*E, X)
  return jnp.einsum("dk,ikp->idp", E, X)


def _t_times_e(E, Q):
  """``Q_i^T @ E`` for every i; ``Q``: ``[n, d, p]``."""
  if E is None:
    return 0.0
  if isinstance(E, tuple):
    return _lowrank_apply_t(*E, Q)
  return jnp.einsum("idp,dk->ipk", Q, E)


def _dense_e(E):
  """``E`` (dense or factored, not None) as a dense ``[d, k]`` array."""
  if isinstance(E, tuple):
    P, V = E
    return jnp.einsum("jdq,jkq->dk", P, V) / P.shape[0]
  return E


# The M-steps. Each returns ``(U [n, d, q], S [n, q], V [n, k, q], DV)``:
# the truncated SVDs ``U_i diag(S_i) V_i^T`` of the residuals ``R_i = D_i +
# E``, and ``DV = diag(U_i^T D_i V_i)`` ``[n, q]`` for the loss from norms
# (``None`` from the dense SVDs, whose loss is always exact).

def _m_step_both(D, V, E, omega, batch):
  """One block power step: ``R_i V_i``, then ``Q_i^T R_i`` (two passes).

  Args:
    D: ``[n, d, k]`` deviations from the mean.
    V: ``[n, k, q]`` current right factors.
    E: the current ``E`` (see :func:`_e_times`).
    omega: the sketch; its first ``q`` columns fill directions the
      residuals lack.
    batch: layers solved together (sizes :func:`_left_products`).

  Returns:
    ``(U, S, V, DV)`` as the M-steps above.
  """
  Y = jnp.einsum("ndk,nkq->ndq", D, V) + _e_times(E, V)
  # Gram-Schmidt, not lowrank.orthonormalize: a basis from Y's Gram matrix
  # loses the residual's small directions (see _m_step_right).
  Q = jax.vmap(lowrank.gram_schmidt)(Y)[0]
  B_d = _left_products(Q, D, batch)                              # Q_i^T D_i
  u, S, V_new = jax.vmap(lowrank.svd_rows, in_axes=(0, None))(
      B_d + _t_times_e(E, Q), omega[:, :V.shape[-1]])
  U = jnp.einsum("ndq,nqp->ndp", Q, u)
  DV = jnp.einsum("nqp,nqk,nkp->np", u, B_d, V_new)
  return U, S, V_new, DV


def _m_step_right(D, V, EV, T):
  """Rayleigh-Ritz approximation of each ``R_i`` in the row space of ``V_i``.

  The row space's orthonormal basis is ``X_i = V_i T_i`` (the left step's
  ``V`` is orthonormal only in its informative columns; the rest are
  fill). ``X`` is never formed: ``R_i X_i = (D_i V_i + E V_i) T_i``, so the
  one pass over the stack is ``D_i V_i`` and the rest are ``q x q``
  products.

  Args:
    D: ``[n, d, k]`` deviations from the mean.
    V: ``[n, k, q]`` right factors of the left step.
    EV: ``[n, d, q]`` ``E V_i``, formed by the left step.
    T: ``[n, q, q]`` transforms with ``V_i T_i`` orthonormal, formed by the
      left step from its ``E V_i`` product (an ``eigh`` here would compete
      with the pass for the cores).

  Returns:
    ``(U, S, V, DV)`` as the M-steps above.
  """
  Y = jnp.einsum("ndk,nkq->ndq", D, V)                           # D_i V_i
  Yc = Y + EV                                                    # R_i V_i
  # Z_i = R_i X_i = Q_i C_i by Gram-Schmidt, not from its Gram matrix, which
  # squares Z_i's condition number: real fine-tunes' residuals have one
  # direction hundreds of times their rank's last, which float32 then loses
  # (the solver stalled at a W-Error of about -8 on the stall fixture of
  # tests/test_solver.py).
  Q, C = jax.vmap(lowrank.gram_schmidt)(jnp.einsum("ndp,npq->ndq", Yc, T))
  # C_i = u diag(S) w^T from the Gram matrix C C^T: u is orthonormal, so U =
  # Q u is, and U diag(S) (X w)^T = Q C X^T whatever the rounding of S and w
  # in C's small directions.
  u, S, inv = jax.vmap(lowrank.svd_of_gram)(jnp.einsum("npq,nrq->npr", C, C))
  S = jnp.where(inv > 0, S, 0.0)         # as U: the loss counts sum S^2
  U = jnp.einsum("ndp,npq->ndq", Q, u)
  Tw = jnp.einsum("nap,nrp,nrs->nas", T, C, u) * inv[:, None, :]
  V_new = jnp.einsum("nkp,npq->nkq", V, Tw)
  DV = jnp.einsum("ndp,ndq,nqp->np", U, Y, Tw)    # diag(U_i^T Y_i T_i w_i)
  return U, S, V_new, DV


def _m_step_left(D, U, UtE, omega, batch):
  """Rayleigh-Ritz approximation of each ``R_i`` in the column space of ``U_i``.

  Args:
    D: ``[n, d, k]`` deviations from the mean.
    U: ``[n, d, q]`` orthonormal left basis of the right step.
    UtE: ``[n, q, k]`` ``U_i^T E``, formed by the right step.
    omega: the sketch; its first ``q`` columns fill directions the
      residuals lack.
    batch: layers solved together (sizes :func:`_left_products`).

  Returns:
    ``(U, S, V, DV)`` as the M-steps above.
  """
  B_d = _left_products(U, D, batch)                              # U_i^T D_i
  u, S, V_new = jax.vmap(lowrank.svd_rows, in_axes=(0, None))(
      B_d + UtE, omega[:, :U.shape[-1]])
  U_new = jnp.einsum("ndq,nqp->ndp", U, u)
  DV = jnp.einsum("nqp,nqk,nkp->np", u, B_d, V_new)
  return U_new, S, V_new, DV


def _m_step_left_full(D, U, UtE, omega, batch):
  """:func:`_m_step_left` where every LoRA works at the full width ``q``.

  The M-step then keeps all of ``R_i``'s projection, ``M_i = U_i U_i^T R_i
  = U_i B_i``, so no SVD is needed: the factors are ``U``, ``S_p =
  ||B_i[p]||`` and ``V[:, p] = B_i[p]^T / S_p``, unit but not orthogonal
  columns (the right step's ``T`` makes them so). ``||M_i||^2 = sum S^2``
  as ``U`` is orthonormal, and ``<D_i, M_i> = <U_i^T D_i, B_i>``.

  Args: as :func:`_m_step_left`.

  Returns:
    ``(U, S, V, DV)`` as the M-steps above.
  """
  B_d = _left_products(U, D, batch)                              # U_i^T D_i
  B = B_d + UtE
  S = jnp.sqrt(jnp.sum(B * B, axis=2))                           # [n, q]
  # Rows of B at zero (directions the residual lacks) take the fill
  # columns, as in lowrank.svd_rows.
  keep = S > 1e-6 * jnp.max(S, axis=1, keepdims=True)
  inv = jnp.where(keep, 1.0 / jnp.where(keep, S, 1.0), 0.0)
  V_new = jnp.where(keep[:, None, :], jnp.swapaxes(B, 1, 2) * inv[:, None, :],
                    omega[:, :U.shape[-1]])
  DV = jnp.sum(B_d * B, axis=2) * inv
  return U, jnp.where(keep, S, 0.0), V_new, DV


def _m_step_randomized(R, width, key, niter):
  """Randomized SVDs (as ``torch.svd_lowrank``) of the dense ``R_i``."""
  return jax.vmap(lambda a: lowrank.svd_randomized(a, width, key, niter))(R)


def _m_step_exact(R, width):
  """Exact truncated SVDs of the dense ``R_i``."""
  return jax.vmap(lambda a: lowrank.svd_exact(a, width))(R)


def _m_step_plain(layer, cfg, E, V, t):
  """The M-step of a step that is not one of the alternating ones.

  Picks the variant of ``cfg.svd`` (statically, while tracing).

  Args:
    layer: the layer's arrays.
    cfg: static options.
    E: the current ``E`` (see :func:`_e_times`).
    V: ``[n, k, q]`` current right factors (their width is the M-step's).
    t: the step's index (seeds the randomized SVD).

  Returns:
    ``(U, S, V, DV)`` as the M-steps above.
  """
  if cfg.svd == "subspace":
    return _m_step_both(layer.D, V, E, layer.omega, cfg.batch)
  R = layer.D + _dense_e(E)[None]
  if cfg.svd == "randomized":
    U, S, V_new = _m_step_randomized(R, V.shape[-1],
                                     jax.random.fold_in(layer.key, t),
                                     cfg.niter)
  else:
    U, S, V_new = _m_step_exact(R, V.shape[-1])
  return U, S, V_new, None


def _w_step(layer, cfg, rank, U, S, V):
  """Truncates an M-step to the working ranks and takes the W-step.

  Args:
    layer: the layer's arrays.
    cfg: static options.
    rank: ``[n]`` working rank of each LoRA.
    U, S, V: the M-step's factors.

  Returns:
    ``(P, S_m, E)``: the new ``P = U diag(S_m)``, ``S_m`` (``S`` with the
    columns past each working rank at zero) and the dense ``E``, formed only
    where the exact loss or the W-Error needs it (else ``None``).
  """
  cols = jnp.arange(V.shape[-1])
  S_m = jnp.where(cols[None, :] < rank[:, None], S, 0.0)
  P = U * S_m[:, None, :]
  dense = cfg.exact_loss or layer.W_true is not None
  return P, S_m, _dense_e((P, V)) if dense else None


def _exact_loss(D, P, V, E, scale):
  """Eq. 3 on the dense residuals ``D_i + E - M_i``, one LoRA at a time."""
  per = [jnp.sum(jnp.square(D[i] + E - P[i] @ V[i].T))
         for i in range(D.shape[0])]
  return functools.reduce(jnp.add, per) * scale


def _gram_loss(sum_d2, P, V, S_m, DV, scale):
  """Eq. 3 from norms, with ``||M_i||^2`` and ``||E||^2`` from Gram matrices.

  ``sum_i ||D_i + E - M_i||^2 = sum_i ||D_i||^2 - 2 <D_i, M_i> + ||M_i||^2 -
  n ||E||^2``, using ``sum_i D_i = 0`` and ``sum_i M_i = n E``. Exact up to
  float32 rounding of ``sum_i ||D_i||^2`` (about 1e-7 of it): far below
  every loss the scheduler acts on, as it acts only while some LoRA is
  below its end rank. ``V`` is orthonormal only to rounding, so its Gram
  matrix is used, not 1.
  """
  n = P.shape[0]
  G_pv = (jnp.einsum("idp,jdq->ijpq", P, P)
          * jnp.einsum("ikp,jkq->ijpq", V, V))
  e2 = jnp.sum(G_pv) / (n * n)
  m2 = jnp.sum(jnp.diagonal(G_pv, axis1=0, axis2=1))
  total = sum_d2 - 2.0 * jnp.sum(S_m * DV) + m2 - n * e2
  return jnp.maximum(total, 0.0) * scale


def _products_loss(sum_d2, S_m, DV, em, scale):
  """Eq. 3 from norms as :func:`_gram_loss`, with no ``n x n`` Gram matrices.

  ``n ||E||^2 = sum_i <E, M_i>`` from ``em[i] = <E, M_i>``, read off a
  product with ``E`` that the next step needs anyway, and ``||M_i||^2 = sum
  S_m^2``: the alternating steps' factors are orthonormal to rounding, a
  relative error of about 1e-6 of ``||M_i||^2``, far below the losses the
  scheduler acts on.
  """
  total = sum_d2 - 2.0 * jnp.sum(S_m * DV) + jnp.sum(S_m * S_m) - jnp.sum(em)
  return jnp.maximum(total, 0.0) * scale


def _w_error(layer, E):
  """``log10 MSE(W - W_true)`` of the state with dense ``E``, or None."""
  if layer.W_true is None:
    return None
  return _log10_mse(_compose(layer.W_bar, layer.mean_d, E), layer.W_true)


def _plain_step(layer, cfg, E, V, t, sched) -> _Step:
  """One M-step (:func:`_m_step_plain`) and W-step.

  Args:
    layer: the layer's arrays.
    cfg: static options.
    E: the current ``E`` (see :func:`_e_times`).
    V: ``[n, k, q]`` current right factors.
    t: the step's index.
    sched: the scheduler's state, whose rank the step works at.

  Returns:
    The step's :class:`_Step`.
  """
  rank = jnp.minimum(sched.rank, layer.end_ranks)
  U, S, V, DV = _m_step_plain(layer, cfg, E, V, t)
  P, S_m, E = _w_step(layer, cfg, rank, U, S, V)
  if cfg.exact_loss:
    loss = _exact_loss(layer.D, P, V, E, cfg.scale)
  else:
    loss = _gram_loss(layer.sum_d2, P, V, S_m, DV, cfg.scale)
  return _Step(rank, P, V, loss, _w_error(layer, E))


def _right_step(layer, cfg, state: _SolverState):
  """The first of two alternating steps (:func:`_m_step_right`).

  Args:
    layer: the layer's arrays.
    cfg: static options.
    state: the carry, with the ``EV`` and ``T`` of the last left step.

  Returns:
    ``(step, U, UtE)``: the :class:`_Step`, the M-step's orthonormal left
    basis ``U`` and ``U_i^T E`` of the new ``E``, which the left step
    takes.
  """
  rank = jnp.minimum(state.sched.rank, layer.end_ranks)
  U, S, V, DV = _m_step_right(layer.D, state.V, state.EV, state.T)
  P, S_m, E = _w_step(layer, cfg, rank, U, S, V)
  UtE = _lowrank_apply_t(P, V, U)
  em = jnp.einsum("ip,ipk,ikp->i", S_m, UtE, V)                  # <E, M_i>
  if cfg.exact_loss:
    loss = _exact_loss(layer.D, P, V, E, cfg.scale)
  else:
    loss = _products_loss(layer.sum_d2, S_m, DV, em, cfg.scale)
  return _Step(rank, P, V, loss, _w_error(layer, E)), U, UtE


def _left_step(layer, cfg, m_step, sched, U, UtE):
  """The second of two alternating steps.

  Args:
    layer: the layer's arrays.
    cfg: static options.
    m_step: :func:`_m_step_left` or :func:`_m_step_left_full`.
    sched: the scheduler's state after the right step.
    U, UtE: from :func:`_right_step`.

  Returns:
    ``(step, (EV, T))``: the :class:`_Step`, ``E V_i`` of the new ``E`` and
    the transforms ``T_i`` with ``V_i T_i`` orthonormal, which the next
    right step takes.
  """
  rank = jnp.minimum(sched.rank, layer.end_ranks)
  U, S, V, DV = m_step(layer.D, U, UtE, layer.omega, cfg.batch)
  P, S_m, E = _w_step(layer, cfg, rank, U, S, V)
  EV, T = _lowrank_apply_rows(P, V)
  em = jnp.einsum("idp,idp->i", EV, P)                           # <E, M_i>
  if cfg.exact_loss:
    loss = _exact_loss(layer.D, P, V, E, cfg.scale)
  else:
    loss = _products_loss(layer.sum_d2, S_m, DV, em, cfg.scale)
  return _Step(rank, P, V, loss, _w_error(layer, E)), (EV, T)


def _schedule_step(cfg, sched, loss, t):
  """The scheduler after the loss of step ``t`` (1-based)."""
  return rank_schedule_step(cfg.schedule, sched, loss, t, cfg.end_rank,
                            cfg.steps)


def _converged(cfg, end_ranks, rank, prev_loss, loss):
  """Whether a step met ``tol``: at the end ranks, with too small a gain."""
  if cfg.tol is None:
    return jnp.asarray(False)
  return jnp.all(rank == end_ranks) & (prev_loss - loss <= cfg.tol * prev_loss)


def _prepare(D, W_bar, key, init, W_true, cfg) -> _Layer:
  """Gathers the arrays every step reads.

  Args:
    D, W_bar, key, init, W_true, cfg: as for :func:`_solve_layer`.

  Returns:
    The layer's :class:`_Layer`.
  """
  end_ranks = jnp.asarray(cfg.ranks, jnp.int32)
  # Summed per slice: no reduction over the stacked axis (see stack_sum).
  sum_d2 = stack_sum(jnp.sum(D * D, axis=(1, 2)))
  E0 = None if init is None else W_bar - init.astype(jnp.float32)
  # The rounding error of W_bar, for the W-Errors of the trace.
  mean_d = stack_mean(D) if W_true is not None else None
  # One Gaussian sketch for every LoRA keeps the result independent of
  # their order; its later columns widen the subspace as the rank grows.
  omega = jnp.linalg.qr(jax.random.normal(
      key, (cfg.k, cfg.width(cfg.end_rank)), jnp.float32))[0]
  return _Layer(D=D, W_bar=W_bar, key=key, end_ranks=end_ranks, sum_d2=sum_d2,
                E0=E0, W_true=W_true, mean_d=mean_d, omega=omega)


def _initial_basis(layer, cfg):
  """Starting right factors at the first phase's width.

  For the subspace method a randomized range finder (``niter`` power
  iterations) on the residuals of the initial ``W``; else the sketch.

  Args:
    layer: the layer's arrays.
    cfg: static options.

  Returns:
    ``[n, k, q0]`` right factors.
  """
  n, k = cfg.n, cfg.k
  q0 = cfg.width(cfg.phases[0][1])
  V = jnp.broadcast_to(layer.omega[:, :q0], (n, k, q0))
  if cfg.svd == "subspace":
    for _ in range(cfg.niter + 1):
      Y = jnp.einsum("ndk,nkq->ndq", layer.D, V) + _e_times(layer.E0, V)
      Qy = jnp.linalg.qr(Y)[0]
      Z = (_left_products(Qy, layer.D, cfg.batch)
           + _t_times_e(layer.E0, Qy))
      V = jnp.linalg.qr(jnp.swapaxes(Z, 1, 2))[0]
  return V


def _init_state(layer, cfg, V) -> _SolverState:
  """The carry before the loops.

  From the mean (``E = 0``) it is the factored state with ``P = 0``, and
  every step runs in the loops. From an ``init``, step 0 is taken here:
  its residuals use the dense initial ``E``, every later step the factored
  one.

  Args:
    layer: the layer's arrays.
    cfg: static options.
    V: ``[n, k, q0]`` starting right factors (:func:`_initial_basis`).

  Returns:
    The first :class:`_SolverState`.
  """
  n, d, steps = cfg.n, cfg.d, cfg.steps
  sched = rank_schedule_init(cfg.schedule, cfg.end_rank)
  loss_tr = jnp.full((steps,), jnp.nan, jnp.float32)
  rank_tr = jnp.zeros((steps, n), jnp.int32)
  werr_tr = None
  if layer.W_true is not None:
    werr_tr = jnp.full((steps,), jnp.nan, jnp.float32)
  if layer.E0 is None:
    return _SolverState(
        step=jnp.asarray(0, jnp.int32),
        P=jnp.zeros((n, d, V.shape[-1]), jnp.float32), V=V, EV=None, T=None,
        sched=sched, loss_trace=loss_tr, rank_trace=rank_tr,
        w_error_trace=werr_tr, loss=jnp.asarray(jnp.nan, jnp.float32),
        done=jnp.asarray(False))
  out = _plain_step(layer, cfg, layer.E0, V, 0, sched)
  sched = _schedule_step(cfg, sched, out.loss, 1)
  if werr_tr is not None:
    werr_tr = werr_tr.at[0].set(out.w_error)
  return _SolverState(
      step=jnp.asarray(1, jnp.int32), P=out.P, V=out.V, EV=None, T=None,
      sched=sched, loss_trace=loss_tr.at[0].set(out.loss),
      rank_trace=rank_tr.at[0].set(out.rank), w_error_trace=werr_tr,
      loss=out.loss, done=jnp.asarray(False))


def _keep_going(stop, bound, state: _SolverState):
  """Loop condition: steps left, ``tol`` not met and, unless ``bound`` is
  None (the last phase), the scheduler's rank still within the phase."""
  go = (state.step < stop) & ~state.done
  return go if bound is None else go & (state.sched.rank <= bound)


def _plain_loop_step(layer, cfg, state: _SolverState) -> _SolverState:
  """Loop body: one :func:`_plain_step` from the factored state.

  Args:
    layer: the layer's arrays.
    cfg: static options.
    state: the carry.

  Returns:
    The carry after the step.
  """
  t = state.step
  out = _plain_step(layer, cfg, (state.P, state.V), state.V, t, state.sched)
  sched = _schedule_step(cfg, state.sched, out.loss, t + 1)
  done = _converged(cfg, layer.end_ranks, out.rank, state.loss, out.loss)
  werr_tr = state.w_error_trace
  if werr_tr is not None:
    werr_tr = werr_tr.at[t].set(out.w_error)
  return _SolverState(
      step=t + 1, P=out.P, V=out.V, EV=None, T=None, sched=sched,
      loss_trace=state.loss_trace.at[t].set(out.loss),
      rank_trace=state.rank_trace.at[t].set(out.rank), w_error_trace=werr_tr,
      loss=out.loss, done=done)


def _set_two(trace, t, t2, ok, first, second):
  """``trace`` with ``first`` at ``t`` and, if ``ok``, ``second`` at ``t2``."""
  trace = trace.at[t].set(first)
  return trace.at[t2].set(jnp.where(ok, second, trace[t2]))


def _alternating_steps(layer, cfg, left_m_step, stop, bound,
                       state: _SolverState) -> _SolverState:
  """Loop body: two steps, each one pass over the stack: right, then left.

  The right step's orthonormal left basis ``U`` seeds the left step, whose
  new row space ``V`` seeds the next right step: together one block power
  iteration, with an M-step and a W-step after each half. The second step
  is kept only if it is due (``stop``, ``tol``, still in this phase);
  otherwise its work is discarded and the loop continues from the first.
  A discarded second step ends the phase's loop for that layer, so its
  ``EV`` and ``T`` are kept either way: the next phase forms its own.

  Args:
    layer: the layer's arrays.
    cfg: static options.
    left_m_step: :func:`_m_step_left` or :func:`_m_step_left_full`.
    stop: int32 number of steps to take at most.
    bound: the phase's highest rank, or None in the last phase.
    state: the carry.

  Returns:
    The carry after one or two steps.
  """
  t = state.step
  right, U, UtE = _right_step(layer, cfg, state)
  sched1 = _schedule_step(cfg, state.sched, right.loss, t + 1)
  done1 = _converged(cfg, layer.end_ranks, right.rank, state.loss, right.loss)
  left, (EV, T) = _left_step(layer, cfg, left_m_step, sched1, U, UtE)
  sched2 = _schedule_step(cfg, sched1, left.loss, t + 2)
  done2 = _converged(cfg, layer.end_ranks, left.rank, right.loss, left.loss)
  ok = (t + 1 < stop) & ~done1
  if bound is not None:
    ok = ok & (sched1.rank <= bound)
  pick = functools.partial(jnp.where, ok)
  t2 = jnp.minimum(t + 1, cfg.steps - 1)
  loss_tr = _set_two(state.loss_trace, t, t2, ok, right.loss, left.loss)
  rank_tr = _set_two(state.rank_trace, t, t2, ok, right.rank, left.rank)
  werr_tr = state.w_error_trace
  if werr_tr is not None:
    werr_tr = _set_two(werr_tr, t, t2, ok, right.w_error, left.w_error)
  return _SolverState(
      step=pick(t + 2, t + 1), P=pick(left.P, right.P),
      V=pick(left.V, right.V), EV=EV, T=T,
      sched=jax.tree.map(pick, sched2, sched1), loss_trace=loss_tr,
      rank_trace=rank_tr, w_error_trace=werr_tr,
      loss=pick(left.loss, right.loss), done=pick(done2, done1))


def _widen(layer, cfg, state: _SolverState, width: int) -> _SolverState:
  """The carry with factors of ``width`` columns for the next phase.

  New columns start at ``P = 0`` with the sketch's next columns as ``V``;
  the alternating steps also get the ``E V_i`` and ``T_i`` of the carry.

  Args:
    layer: the layer's arrays.
    cfg: static options.
    state: the carry of the previous phase (or :func:`_init_state`).
    width: the phase's number of columns.

  Returns:
    The carry for the phase's loop.
  """
  n, d, k = cfg.n, cfg.d, cfg.k
  P, V = state.P, state.V
  qa = P.shape[-1]
  if width > qa:
    P = jnp.concatenate([P, jnp.zeros((n, d, width - qa), P.dtype)], -1)
    V = jnp.concatenate(
        [V, jnp.broadcast_to(layer.omega[:, qa:width], (n, k, width - qa))],
        -1)
  if cfg.alternating:
    EV, T = _lowrank_apply_rows(P, V)
    return state._replace(P=P, V=V, EV=EV, T=T)
  return state._replace(P=P, V=V)


def _splits_full_width(cfg) -> bool:
  """Whether the last phase's loop is split where the left steps become
  full width (:func:`_m_step_left_full`, no SVD), and again before the
  last ``_FULL_WIDTH_TAIL`` steps, which take the SVD left step.

  That needs one end rank for every LoRA and no oversampling. Short runs
  (the Mistral bench's 30 steps) keep one loop: the split would run few
  steps or none, and its program costs memory (about 13 MiB there).
  """
  return (cfg.alternating and len(set(cfg.ranks)) == 1
          and cfg.width(cfg.end_rank) == cfg.end_rank
          and cfg.steps >= 4 * _FULL_WIDTH_TAIL)


def _run(layer, cfg, state: _SolverState, stop) -> _SolverState:
  """Runs the steps: one ``lax.while_loop`` per phase of the scheduler.

  Each phase's factors have a static width that covers its levels (see
  :func:`rank_phases`), so the products with the stack cost about what the
  working rank needs, not the end rank. A phase's loop runs while the
  scheduler's rank is within it; the last one runs to the end whatever the
  rank. Under vmap each layer keeps its own trajectory (the batched loop
  freezes layers in another phase), so batches equal per-layer calls.

  Args:
    layer: the layer's arrays.
    cfg: static options.
    state: the carry of :func:`_init_state`.
    stop: int32 number of steps to take at most.

  Returns:
    The carry after the last step.
  """
  phases = cfg.phases
  # A run of one step from an initial W (auto's polishing step) is step 0
  # alone: no loop is compiled, which halves the program's compile time.
  if layer.E0 is not None and cfg.steps == 1:
    phases = ()
  for j, (bound, level) in enumerate(phases):
    if j == len(phases) - 1:
      bound = None
    state = _widen(layer, cfg, state, cfg.width(level))
    keep_going = functools.partial(_keep_going, stop, bound)
    if not cfg.alternating:
      state = jax.lax.while_loop(
          keep_going, functools.partial(_plain_loop_step, layer, cfg), state)
      continue
    steps = functools.partial(_alternating_steps, layer, cfg, _m_step_left,
                              stop, bound)
    if bound is None and _splits_full_width(cfg):
      state = jax.lax.while_loop(
          lambda s: keep_going(s) & (s.sched.rank < cfg.end_rank), steps,
          state)
      state = jax.lax.while_loop(
          lambda s: keep_going(s) & (s.step < stop - _FULL_WIDTH_TAIL),
          functools.partial(_alternating_steps, layer, cfg,
                            _m_step_left_full, stop, None), state)
    state = jax.lax.while_loop(keep_going, steps, state)
  return state


def _finish(layer, cfg, state: _SolverState):
  """Refines the last state and writes the diagnostics.

  Args:
    layer: the layer's arrays.
    cfg: static options.
    state: the carry after the last step.

  Returns:
    ``(W, Diagnostics)`` as :func:`spectral_detuning` returns them.
  """
  factors, res2 = _refine(layer.D, state.P, state.V, cfg.refine, cfg.batch)
  W = _compose_blocks(layer.W_bar, layer.D, factors, cfg.batch)
  last = state.step - 1
  loss, loss_tr = state.loss, state.loss_trace
  if not cfg.exact_loss:
    # Trace values below ~1e-7 of sum_i ||D_i||^2 / (n d k) are float32 noise
    # of the loss from norms; the final loss is computed on the residuals
    # (those of the factored state, without the refinement).
    loss = res2 * cfg.scale
    loss_tr = loss_tr.at[last].set(loss)
  werr_tr = state.w_error_trace
  if werr_tr is not None:
    werr_tr = werr_tr.at[last].set(_log10_mse(W, layer.W_true))
  return W, Diagnostics(loss=loss_tr, rank=state.rank_trace, steps=state.step,
                        final_rank=state.rank_trace[last], final_loss=loss,
                        w_error=werr_tr)


def _solve_layer(D, W_bar, key, init, W_true, stop, *, cfg: _Config):
  """Spectral DeTuning for one layer given ``D = W'_i - W_bar`` (traceable).

  A residual ``W'_i - W = D_i + E`` is never formed by the subspace
  method: its products with thin matrices are ``D_i X + E X`` with ``E X``
  taken through the factors, so each step touches the dense stack in thin
  products only: one per LoRA (``D_i V_i`` or ``U_i^T D_i``) with
  alternating steps, two (``D_i V_i`` and ``Q_i^T D_i``) without.

  Args:
    D: ``[n, d, k]`` float32 deviations from the mean.
    W_bar: ``[d, k]`` float32 mean of the ``W'_i``.
    key: seed of the sketches.
    init: optional ``[d, k]`` starting ``W``.
    W_true: optional ``[d, k]`` ground truth for the W-Error trace.
    stop: int32 number of steps to take at most.
    cfg: static options.

  Returns:
    ``(W, Diagnostics)``.
  """
  layer = _prepare(D, W_bar, key, init, W_true, cfg)
  state = _init_state(layer, cfg, _initial_basis(layer, cfg))
  state = _run(layer, cfg, state, stop)
  return _finish(layer, cfg, state)


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
  n, d, k = D.shape[-3:]
  cfg = _Config(n=n, d=d, k=k, ranks=ranks, steps=steps, schedule=schedule,
                svd=svd, tol=tol, niter=niter, oversample=oversample,
                exact_loss=exact_loss or svd != "subspace" or tol is not None,
                refine=refine, alternate=alternate,
                batch=D.shape[0] if D.ndim == 4 else 1)
  fn = functools.partial(_solve_layer, cfg=cfg)
  if D.ndim == 3:
    return fn(D, W_bar, key, init, W_true, stop)
  if D.shape[0] == 1:
    # One layer: solved without vmap. Batched, the in-place accumulations
    # (dynamic_update_slice) become scatters that XLA:CPU writes into a new
    # buffer each time (12 MiB more on the Mistral-shaped layer).
    first = lambda x: None if x is None else x[0]
    W, diag = fn(D[0], W_bar[0], key, first(init), first(W_true), stop)
    return jax.tree.map(lambda x: x[None], (W, diag))
  return jax.vmap(fn, in_axes=(0, 0, None, None if init is None else 0,
                               None if W_true is None else 0, None))(
                                   D, W_bar, key, init, W_true, stop)


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
    schedule: :class:`RankSchedule` (default: paper Table 9 but a plateau
      threshold, see :class:`RankSchedule`; use
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
    exact_loss: compute the per-step loss on dense residuals (about one more
      pass over the stack per step) instead of from norms of the factors,
      which is exact up to float32 rounding of ``sum_i ||W'_i - mean W'||^2``
      (about 1e-7 of it: smaller trace values are noise, far below the
      losses the scheduler acts on).
      ``final_loss`` is always exact. Forced on by ``tol`` and by the
      ``"exact"``/``"randomized"`` methods.
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
    alternate: ``"subspace"`` only. ``True``: steps alternate between a
      right and a left one-sided M-step (Rayleigh-Ritz in the current row
      space, then in the new column space), one pass over the stack each;
      ``False``: every step takes both products (two passes). Same final
      W-Error at about half the time (768x768, n=5, r=16: 1.44 s against
      2.51 s for 300 steps, ``experiments.bench_solver``).

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
  init = _one_per_layer("init", init, W_primes.shape)
  W_true = _one_per_layer("W_true", W_true, W_primes.shape)
  owned = owned or W_primes.dtype != jnp.float32
  W_primes = W_primes.astype(jnp.float32)
  D, W_bar = _center(W_primes, donate=owned or donate_input)
  del W_primes
  stop = jnp.asarray(steps if stop_after is None
                     else max(1, min(int(stop_after), int(steps))), jnp.int32)
  return programs.call(_solve, "spectral_detuning",
                       (D, W_bar, jax.random.key(seed), init, W_true, stop),
                       statics, donate=(1,))


def _one_per_layer(name, x, shape):
  """``x`` as float32, checked to be one ``[d, k]`` matrix per layer of a
  stack of ``shape``; None stays None."""
  if x is None:
    return None
  x = jnp.asarray(x, jnp.float32)
  expected = tuple(shape[:-3]) + tuple(shape[-2:])
  if x.shape != expected:
    raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {expected}")
  return x


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
  is 1.47x the stack with it (docs/results.md, "Memory").

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
