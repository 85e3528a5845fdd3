"""Closed-form detuning by subspace intersection (n >= 3 fine-tunes).

With exactly low-rank updates ``W'_i = W + M_i``, ``rank(M_i) = r_i``, every
difference ``D_ij = W'_i - W'_j = M_i - M_j`` has column space
``col(M_i) + col(M_j)`` (generically, while ``r_i + r_j + r_l <= min(d, k)``).
So ``col(M_i)`` is the intersection of ``col(D_ij)`` over the other ``j``, and
the same holds for row spaces. With those subspaces ``U_i [d, r_i]`` and
``V_i [k, r_i]`` known, ``M_i = U_i C_i V_i^T`` leaves only the small cores
``C_i [r_i, r_i]``, which are the linear least-squares solution of

    min_{W, C_i}  sum_i ||W'_i - W - U_i C_i V_i^T||_F^2,

i.e. ``C_i = U_i^T (W'_i - W) V_i`` and ``W = mean_i (W'_i - U_i C_i V_i^T)``,
one symmetric positive (semi)definite system in the ``sum_i r_i^2`` core
entries. Two fine-tunes are not enough: a rank ``r_1 + r_2`` difference can be
split into a rank-``r_1`` and a rank-``r_2`` part in infinitely many ways.

The intersection is computed through principal angles, never thresholds on
raw differences: for LoRA ``i`` with ``m = n - 1`` partners, the orthonormal
bases ``Q_ij`` of the differences are stacked and the eigen-decomposition of
their Gram matrix gives ``sum_j Q_ij Q_ij^T``'s spectrum ``sigma_t^2``; a
direction shared by all ``m`` subspaces has ``sigma^2 = m``. The generalised
cosine ``c_t = (sigma_t^2 - 1) / (m - 1)`` is the cosine of the principal
angles for ``m = 2`` (the singular values of ``Q_a^T Q_b``); ``c_{r_i}``
should be 1 and the gap ``c_{r_i} - c_{r_i + 1}`` says how well-posed the
layer is (1: separated subspaces; near 0: nearly shared, ill-posed).
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from detune_jax import programs
from detune_jax.solvers import lowrank
from detune_jax.solvers.spectral_detuning import (Rank, check_stack,
                                                  normalize_ranks,
                                                  stack_mean)

PAIR_SVD_METHODS = ("randomized", "exact")
# Above this many core unknowns (n * r_max^2) the core system is solved by
# conjugate gradients instead of a dense solve.
DENSE_CORE_LIMIT = 4096


class NotIdentifiableError(ValueError):
  """The closed form cannot determine ``W`` from these inputs."""


@programs.register_output
class IntersectionDiagnostics(NamedTuple):
  """What a closed-form solve found. A layer axis adds a leading ``L``.

  The first five fields match :class:`Diagnostics` of ``spectral_detuning``
  so that code reading those works with either solver.

  Attributes:
    loss: ``[1]`` float32 loss of Eq. 3 for ``W`` and ``M_i = U_i C_i V_i^T``.
    rank: ``[1, n]`` int32 ranks used.
    steps: int32 number of iterative steps (0: one shot).
    final_rank: ``[n]`` int32 ranks used.
    final_loss: float32, same as ``loss[0]``.
    col_cos: ``[n, 2]`` generalised cosines ``(c_{r_i}, c_{r_i+1})`` of the
      column-space intersection (1 and < 1 when well-posed).
    row_cos: ``[n, 2]`` the same for the row spaces.
    gap: ``[n]`` float32 principal-angle gap of each LoRA,
      ``min(col, row)`` of ``c_{r_i} - c_{r_i+1}``: near 1 well-posed, near 0
      (nearly shared directions) ill-posed.
    core_min_eig: float32 smallest eigenvalue of the core system (in
      ``[0, 1]``; 0 means a direction shared by all LoRAs, which no method
      can attribute to ``W`` or the ``M_i``).
  """
  loss: jnp.ndarray
  rank: jnp.ndarray
  steps: jnp.ndarray
  final_rank: jnp.ndarray
  final_loss: jnp.ndarray
  col_cos: jnp.ndarray
  row_cos: jnp.ndarray
  gap: jnp.ndarray
  core_min_eig: jnp.ndarray


def _pair_bases(D, q, key, svd, oversample, niter):
  """Orthonormal column and row bases ``[d, q]``, ``[k, q]`` of ``D``."""
  d, k = D.shape
  if svd == "exact":
    U, _, V = lowrank.svd_exact(D, q)
    return U, V
  p = min(q + oversample, d, k)
  U, _, V = lowrank.svd_randomized(D, p, key, niter)
  return U[:, :q], V[:, :q]


def _intersect(Qs, r):
  """Common ``r``-dimensional subspace of the bases ``Qs`` (list of ``[d, q_j]``).

  Returns:
    ``(basis [d, r], cos [2])``: orthonormal basis and the generalised
    cosines ``(c_r, c_{r+1})``.
  """
  m = len(Qs)
  Q = jnp.concatenate(Qs, axis=1)                      # [d, N]
  G = Q.T @ Q                                           # [N, N]
  evals, evecs = jnp.linalg.eigh(G)                     # ascending
  evals, evecs = evals[::-1], evecs[:, ::-1]
  basis = lowrank._orth(Q @ evecs[:, :r])  # pylint: disable=protected-access
  c = (evals[r - 1:r + 1] - 1.0) / (m - 1)
  return basis, jnp.clip(c, -1.0, 1.0)


def _core_system(U, V, R, n):
  """Dense operator ``A = I - K / n`` and right side ``b`` of the cores.

  ``U: [n, d, r]``, ``V: [n, k, r]`` (zero-padded past each LoRA's rank),
  ``R: [n, d, k]`` = ``W'_i - mean_j W'_j``.
  """
  G = jnp.einsum("idr,jds->ijrs", U, U)                 # U_i^T U_j
  H = jnp.einsum("ikr,jks->ijrs", V, V)                 # V_i^T V_j
  b = jnp.einsum("irk,iks->irs", jnp.einsum("idr,idk->irk", U, R), V)
  return G, H, b


def _solve_cores(G, H, b, n, r, dense, power_steps=30):
  """Solves ``C_i - (1/n) sum_j G_ij C_j H_ji = b_i`` for ``C [n, r, r]``.

  Returns ``(C, min_eig)`` with ``min_eig`` the smallest eigenvalue of the
  (symmetric, positive semidefinite) operator, by power iteration on its
  complement ``K / n`` (eigenvalues in ``[0, 1]``).
  """
  N = n * r * r

  def kmul(c):
    return jnp.einsum("ijac,jce,jieb->iab", G, c, H) / n

  if dense:
    K = jnp.einsum("ijac,jieb->iabjce", G, H).reshape(N, N) / n
    A = jnp.eye(N, dtype=b.dtype) - 0.5 * (K + K.T)
    C = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(A),
                                   b.reshape(N)).reshape(n, r, r)
  else:
    C, _ = jax.scipy.sparse.linalg.cg(lambda c: c - kmul(c), b, x0=b,
                                      tol=1e-7, maxiter=300)

  def power(_, v):
    v = kmul(v)
    return v / jnp.maximum(jnp.linalg.norm(v), 1e-30)
  v = jax.lax.fori_loop(0, power_steps, power,
                        b / jnp.maximum(jnp.linalg.norm(b), 1e-30))
  min_eig = 1.0 - jnp.vdot(v, kmul(v))
  return C, min_eig


def _solve_layer(W_primes, key, *, ranks, svd, oversample, niter):
  """Closed form for one ``[n, d, k]`` float32 stack (traceable)."""
  n, d, k = W_primes.shape
  r = max(ranks)
  Ucol = {i: [] for i in range(n)}
  Vrow = {i: [] for i in range(n)}
  for i, j in itertools.combinations(range(n), 2):
    kij = jax.random.fold_in(key, i * n + j)
    Uq, Vq = _pair_bases(W_primes[i] - W_primes[j], ranks[i] + ranks[j], kij,
                         svd, oversample, niter)
    Ucol[i].append(Uq), Ucol[j].append(Uq)
    Vrow[i].append(Vq), Vrow[j].append(Vq)
  Us, Vs, col_cos, row_cos = [], [], [], []
  for i in range(n):
    Ui, ci = _intersect(Ucol[i], ranks[i])
    Vi, ri = _intersect(Vrow[i], ranks[i])
    pad = ((0, 0), (0, r - ranks[i]))
    Us.append(jnp.pad(Ui, pad)), Vs.append(jnp.pad(Vi, pad))
    col_cos.append(ci), row_cos.append(ri)
  U, V = jnp.stack(Us), jnp.stack(Vs)
  W_bar = stack_mean(W_primes)
  R = W_primes - W_bar[None]
  G, H, b = _core_system(U, V, R, n)
  C, min_eig = _solve_cores(G, H, b, n, r, dense=n * r * r <= DENSE_CORE_LIMIT)
  M = jnp.einsum("idr,irk->idk", U, jnp.einsum("irs,iks->irk", C, V))
  W = W_bar - stack_mean(M)
  E = W_primes - W[None] - M
  loss = jnp.mean(jnp.mean(E * E, axis=(1, 2)))
  col_cos, row_cos = jnp.stack(col_cos), jnp.stack(row_cos)
  gap = jnp.minimum(col_cos[:, 0] - col_cos[:, 1], row_cos[:, 0] - row_cos[:, 1])
  ranks_arr = jnp.asarray(ranks, jnp.int32)
  return W, IntersectionDiagnostics(
      loss=loss[None], rank=ranks_arr[None], steps=jnp.asarray(0, jnp.int32),
      final_rank=ranks_arr, final_loss=loss, col_cos=col_cos, row_cos=row_cos,
      gap=gap, core_min_eig=min_eig)


@functools.partial(jax.jit, static_argnames=("ranks", "svd", "oversample",
                                             "niter"))
def _solve(W_primes, key, *, ranks, svd, oversample, niter):
  fn = functools.partial(_solve_layer, ranks=ranks, svd=svd,
                         oversample=oversample, niter=niter)
  if W_primes.ndim == 4:
    # lax.map (a scan over layers), not jax.vmap: vmapped, the independent
    # pairwise SVDs become batched LAPACK calls that XLA:CPU may run side
    # by side, which deadlocks its thread pool (see lowrank.after); one
    # layer at a time they are single-matrix calls, and each layer is large
    # enough to keep the cores busy on its own.
    return jax.lax.map(lambda w: fn(w, key), W_primes)
  return fn(W_primes, key)


def check_identifiable(n: int, ranks, d: int, k: int):
  """Raises :class:`NotIdentifiableError` when the closed form cannot apply."""
  if n < 3:
    raise NotIdentifiableError(
        f"the closed form needs at least 3 fine-tuned versions of a layer, got "
        f"{n}: with 2, the difference W'_1 - W'_2 (rank r_1 + r_2) splits into "
        "a rank-r_1 and a rank-r_2 part in infinitely many ways, so W is not "
        "determined; use spectral_detuning (iterative, a local solution) or "
        "release/collect a third model")
  top = sorted(ranks)[-3:]
  if sum(top) > min(d, k):
    raise NotIdentifiableError(
        f"ranks {tuple(ranks)} are too large for a [{d}, {k}] layer: the three "
        f"largest sum to {sum(top)} > min(d, k) = {min(d, k)}, so the column "
        "spaces of the differences do not intersect in the LoRA subspaces")


def subspace_intersection_detuning(W_primes, rank: Rank, *, seed: int = 0,
                                   svd: str = "randomized",
                                   oversample: int = 8, niter: int = 2):
  """Recovers ``W`` in one shot from ``n >= 3`` fine-tunes (closed form).

  Args:
    W_primes: ``[n, d, k]`` or ``[L, n, d, k]`` (vmapped over layers); any
      float dtype, computed in float32.
    rank: LoRA rank, an int or one int per LoRA.
    seed: seed of the randomized range finders.
    svd: how the pairwise differences' subspaces are found: ``"randomized"``
      (range finder with ``oversample`` extra columns and ``niter`` power
      iterations; exact for exactly low-rank differences) or ``"exact"``.
    oversample: extra sketch columns of the randomized range finder.
    niter: power iterations of the randomized range finder.

  Returns:
    ``(W, diagnostics)``: float32 ``[d, k]`` (or ``[L, d, k]``) and
    :class:`IntersectionDiagnostics`.

  Raises:
    NotIdentifiableError: ``n < 3``, or ranks too large for the layer.

  >>> import jax, jax.numpy as jnp
  >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  >>> W = jax.random.normal(k1, (64, 48)) * 0.02
  >>> B = jax.random.normal(k2, (3, 64, 4)) * 0.02
  >>> A = jax.random.normal(k3, (3, 4, 48)) * 0.02
  >>> W_rec, diag = subspace_intersection_detuning(W + B @ A, rank=4)
  >>> bool(jnp.log10(jnp.mean((W_rec - W) ** 2)) < -12)
  True
  """
  W_primes = check_stack(W_primes)
  if svd not in PAIR_SVD_METHODS:
    raise ValueError(f"unknown svd method {svd!r}; expected one of "
                     f"{PAIR_SVD_METHODS}")
  n, d, k = W_primes.shape[-3:]
  if n < 3:
    check_identifiable(n, (1,) * n, d, k)
  ranks = normalize_ranks(rank, n, d, k)
  check_identifiable(n, ranks, d, k)
  return programs.call(
      _solve, "closed_form", (W_primes.astype(jnp.float32),
                              jax.random.key(seed)),
      dict(ranks=ranks, svd=svd, oversample=int(oversample),
           niter=int(niter)))


def low_rank_parts(W_primes, W, rank: Rank):
  """Best rank-``r_i`` ``M_i`` of ``W'_i - W`` (exact SVD), ``[n, d, k]``."""
  W_primes = jnp.asarray(W_primes, jnp.float32)
  n, d, k = W_primes.shape[-3:]
  ranks = normalize_ranks(rank, n, d, k)
  R = W_primes - jnp.asarray(W, jnp.float32)[..., None, :, :]
  u, s, vh = jnp.linalg.svd(R, full_matrices=False)
  keep = jnp.arange(s.shape[-1]) < jnp.asarray(ranks)[:, None]
  return jnp.einsum("...dq,...q,...qk->...dk", u, jnp.where(keep, s, 0.0), vh)


__all__ = ["IntersectionDiagnostics", "NotIdentifiableError",
           "check_identifiable", "subspace_intersection_detuning",
           "low_rank_parts"]
