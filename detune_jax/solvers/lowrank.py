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


def _orth(x):
  return jnp.linalg.qr(x, mode="reduced")[0]


def _rayleigh_ritz(A, Q):
  """SVD of ``A`` restricted to the column space of orthonormal ``Q``."""
  ub, s, vh = jnp.linalg.svd(Q.T @ A, full_matrices=False)
  return Q @ ub, s, vh.T


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
