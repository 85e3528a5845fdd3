"""Truncated SVD kernels used by the M-step.

All take one matrix ``A`` of shape ``[d, k]`` and return ``(U, S, V)`` with
``U: [d, q]``, ``S: [q]`` (descending), ``V: [k, q]`` such that
``A ~= U @ diag(S) @ V.T``. Callers vmap them over LoRAs and layers.

Methods:
  * ``"exact"``: ``jnp.linalg.svd`` of the whole matrix, truncated.
  * ``"randomized"``: Halko et al. randomized range finder with ``niter`` power
    iterations, as ``torch.svd_lowrank`` does (fresh Gaussian sketch per call).
  * ``"subspace"``: one step of block power (subspace) iteration started from
    the previous call's right singular vectors ``V0``, then Rayleigh-Ritz. The
    residuals of consecutive Spectral DeTuning steps differ little, so a single
    warm-started step tracks the leading subspace at a fraction of the cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SVD_METHODS = ("exact", "randomized", "subspace")


def after(x, dep):
  """``x``, computed only once ``dep`` is: orders two LAPACK calls.

  jaxlib 0.10's batched LAPACK kernels split their batch over XLA:CPU's
  intra-op thread pool and block the pool thread they run on until the
  pieces are done; XLA runs independent instructions at once, so two such
  calls side by side can block every thread of the pool (2 on a 2-core
  machine) with their pieces queued, and the program hangs. A data
  dependency orders them (an ``optimization_barrier`` does not: XLA:CPU
  drops it). ``x`` comes back bit for bit (times 1, or nan where ``dep``
  starts with a nan). ``tests/test_lapack_order.py`` checks every program
  the solvers compile.
  """
  first = jnp.reshape(dep, (-1,))[0]
  return x * jnp.where(jnp.isnan(first), jnp.nan, 1.0).astype(x.dtype)


def _orth(x):
  return jnp.linalg.qr(x, mode="reduced")[0]


def svd_wide(B):
  """SVD of a short, wide ``B: [q, k]`` (``q <= k``) as ``(u, s, V)``.

  ``B = u @ diag(s) @ V.T`` with ``u: [q, q]``, ``V: [k, q]`` orthonormal.
  LAPACK's SVD of a wide matrix is slow on CPU; a QR of ``B.T`` followed by
  the SVD of the ``q x q`` triangle costs a fraction of it (measured 0.9 ms
  against 3.3 ms for five ``[16, 768]`` matrices on 2 cores).
  """
  qz, rz = jnp.linalg.qr(B.T)                 # B.T = qz rz, qz: [k, q]
  u, s, wh = jnp.linalg.svd(after(rz.T, qz))  # rz.T = u s wh
  return u, s, qz @ wh.T


def orthonormalize(Y, rtol: float = 1e-6):
  """An orthonormal basis of the columns of ``Y: [d, q]`` via its Gram matrix.

  ``Y^T Y = W diag(lam) W^T``; returns ``Y W diag(lam)^{-1/2}``, with the
  columns of eigenvalues below ``rtol`` times the largest set to zero (their
  directions are lost to rounding anyway). One small ``eigh`` and matrix
  products instead of a Householder QR, which XLA:CPU runs as a slow LAPACK
  call (0.23 ms against 0.8 ms for five ``[768, 16]`` matrices on 2 cores).
  Column order follows ``lam`` (ascending).
  """
  return Y @ orthonormalizer(Y.T @ Y, rtol)


def range_basis(Y, rtol: float = 1e-6):
  """An orthonormal basis of the range of ``Y: [d, q]`` from its thin SVD.

  Columns whose singular value is at most ``rtol`` times the largest are
  zero, wherever they sit among the columns of ``Y``. Precise whatever the
  conditioning of ``Y`` (a LAPACK call: for one-off bases, not loops).
  """
  U, s, _ = jnp.linalg.svd(Y, full_matrices=False)
  return U * (s > rtol * s[0])[None, :]


def gram_schmidt(Z, rtol: float = 1e-6):
  """``(Q, C)`` with ``Q: [d, q]`` orthonormal and ``Z = Q C``, ``C``
  upper triangular, by classical Gram-Schmidt with one reorthogonalisation
  (CGS2).

  Column by column, so each column keeps its own precision whatever the
  ratio of the columns' lengths: unlike a basis from ``Z^T Z``, which
  squares the condition number of ``Z`` and, in float32, loses the
  directions more than about 1e3 below the largest. Matrix-vector products
  in a ``fori_loop`` instead of a Householder QR, which XLA:CPU runs as a
  slow LAPACK call. A column left at less than ``rtol`` of its length after
  projection (a direction the earlier columns already hold) is zero in
  ``Q`` and has a zero diagonal in ``C``.
  """
  q = Z.shape[1]

  def column(j, carry):
    Q, C = carry
    z0 = jax.lax.dynamic_index_in_dim(Z, j, axis=1, keepdims=False)
    h1 = Q.T @ z0
    z = z0 - Q @ h1
    h2 = Q.T @ z
    z = z - Q @ h2
    norm = jnp.sqrt(jnp.sum(z * z))
    ok = norm > rtol * jnp.sqrt(jnp.sum(z0 * z0)) + 1e-30
    qj = jnp.where(ok, z / jnp.where(ok, norm, 1.0), 0.0)
    Q = jax.lax.dynamic_update_index_in_dim(Q, qj, j, axis=1)
    cj = (h1 + h2).at[j].set(jnp.where(ok, norm, 0.0))
    C = jax.lax.dynamic_update_index_in_dim(C, cj, j, axis=1)
    return Q, C

  return jax.lax.fori_loop(
      0, q, column, (jnp.zeros_like(Z), jnp.zeros((q, q), Z.dtype)))


def orthonormalizer(G, rtol: float = 1e-6):
  """The ``[q, q]`` transform ``T`` with ``Y @ T`` orthonormal, from the Gram
  matrix ``G = Y^T Y`` (see :func:`orthonormalize`)."""
  lam, w = jnp.linalg.eigh(G)
  keep = lam > rtol * lam[-1]
  inv = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
  return w * inv[None, :]


def svd_rows(B, fill, rtol: float = 1e-6):
  """Leading singular triplets of a wide ``B: [q, k]`` from ``B B^T``.

  Returns ``(u [q, q], s [q], V [k, q])`` with ``s`` descending and
  ``B ~= u diag(s) V^T``. Columns of ``V`` whose singular value is below
  ``rtol`` times the largest carry no information; they are replaced by the
  matching columns of ``fill: [k, q]`` so that a subspace iteration started
  from ``V`` keeps exploring ``q`` directions.
  """
  u, s, inv = svd_of_gram(B @ B.T, rtol)
  V = (B.T @ u) * inv[None]
  return u, s, jnp.where((inv > 0)[None], V, fill)


def svd_of_gram(G, rtol: float = 1e-6):
  """``(u, s, inv)`` from the Gram matrix ``G = B B^T`` of a ``B: [q, k]``.

  ``B = u diag(s) V^T`` (``s`` descending) with ``V = B^T u diag(inv)``:
  ``inv`` is ``1 / s`` where ``s`` is above ``rtol`` times the largest, 0
  below (those columns of ``V`` carry no information).
  """
  lam, u = jnp.linalg.eigh(G)
  lam, u = lam[::-1], u[:, ::-1]
  s = jnp.sqrt(jnp.maximum(lam, 0.0))
  keep = s > rtol * s[0]
  return u, s, jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)


def _rayleigh_ritz(A, Q):
  """SVD of ``A`` restricted to the column space of orthonormal ``Q``."""
  # The barrier keeps ``Q.T @ A`` a product of its own: otherwise XLA:CPU
  # folds svd_wide's transpose into it and computes ``A.T @ Q``, which it
  # runs several times slower on a large ``A``: with the barrier ``auto``
  # on one 2048x2048 bf16 layer (r=16, n=3) took 19.7 s instead of 33.0 s
  # (``git show 328b8e0:docs/results.md``, "The grid step on large
  # layers").
  u, s, V = svd_wide(jax.lax.optimization_barrier(Q.T @ A))
  return Q @ u, s, V


def svd_exact(A, q: int):
  """Exact truncated SVD: the ``q`` leading singular triplets."""
  u, s, vh = jnp.linalg.svd(A, full_matrices=False)
  return u[:, :q], s[:q], vh[:q].T


def svd_randomized(A, q: int, key, niter: int = 2):
  """Randomized truncated SVD with ``niter`` power iterations.

  Follows the algorithm of ``torch.svd_lowrank`` (Halko, Martinsson & Tropp
  2011, Alg. 4.4): a Gaussian sketch, ``niter`` QR-stabilised power
  iterations, then an exact SVD of the small projected matrix.
  """
  omega = jax.random.normal(key, (A.shape[1], q), A.dtype)
  Q = _orth(A @ omega)
  for _ in range(niter):
    Q = _orth(A.T @ Q)
    Q = _orth(A @ Q)
  return _rayleigh_ritz(A, Q)


def svd_subspace(A, V0):
  """One warm-started subspace-iteration step from right vectors ``V0: [k, q]``."""
  return _rayleigh_ritz(A, _orth(A @ V0))


def truncated_svd(A, q: int, method: str = "exact", *, key=None, V0=None,
                  niter: int = 2):
  """Dispatches to one of :data:`SVD_METHODS`.

  Args:
    A: ``[d, k]`` matrix.
    q: number of singular triplets (static).
    method: one of ``"exact"``, ``"randomized"``, ``"subspace"``.
    key: PRNG key (``"randomized"``; ``"subspace"`` without ``V0``).
    V0: ``[k, q]`` warm start for ``"subspace"``; without it a randomized
      start with ``niter`` power iterations is used.
    niter: power iterations of the randomized method.

  Returns:
    ``(U [d, q], S [q], V [k, q])``.

  >>> import jax, jax.numpy as jnp
  >>> A = jax.random.normal(jax.random.key(0), (6, 2)) @ jax.random.normal(
  ...     jax.random.key(1), (2, 5))
  >>> U, S, V = truncated_svd(A, 2, "randomized", key=jax.random.key(2))
  >>> bool(jnp.allclose(U * S @ V.T, A, atol=1e-4))
  True
  """
  if method == "exact":
    return svd_exact(A, q)
  if method == "randomized":
    return svd_randomized(A, q, key, niter)
  if method == "subspace":
    if V0 is None:
      return svd_randomized(A, q, key, niter)
    return svd_subspace(A, V0)
  raise ValueError(f"unknown svd method {method!r}; expected one of {SVD_METHODS}")
