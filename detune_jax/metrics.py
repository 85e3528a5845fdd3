"""Metrics of LoWRA Bench (Horwitz et al. 2024, Sec. 6.2).

* :func:`w_error`: mean over layers of ``log10 MSE(W_P - W*)`` (Eq. 8).
* :func:`detuning_loss`: the objective of Eq. 3 for an estimate ``W``, with
  the optimal rank-``r_i`` ``M_i`` for that ``W``.
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

# log10 of an MSE of exactly 0 (a bit-exact recovery) is -inf; it is reported
# as log10(MSE_FLOOR) so that means over layers stay finite.
MSE_FLOOR = 1e-30

Layers = Union[jnp.ndarray, np.ndarray, Sequence, Mapping]


def mse(W, W_true):
  """Mean squared error, computed in float32."""
  d = jnp.asarray(W, jnp.float32) - jnp.asarray(W_true, jnp.float32)
  return jnp.mean(d * d)


def layer_w_error(W, W_true):
  """``log10 MSE`` of one layer (any shape), floored at ``log10(MSE_FLOOR)``."""
  return jnp.log10(jnp.maximum(mse(W, W_true), MSE_FLOOR))


def _pairs(W, W_true):
  if isinstance(W, Mapping):
    return [(W[k], W_true[k]) for k in W]
  if isinstance(W, (list, tuple)):
    if len(W) != len(W_true):
      raise ValueError(f"{len(W)} recovered layers but {len(W_true)} true ones")
    return list(zip(W, W_true))
  W, W_true = jnp.asarray(W), jnp.asarray(W_true)
  if W.shape != W_true.shape:
    raise ValueError(f"shape mismatch: {W.shape} vs {W_true.shape}")
  if W.ndim == 3:  # [L, d, k]: a batch of same-shape layers
    return None
  return [(W, W_true)]


def layer_w_errors(W: Layers, W_true: Layers) -> jnp.ndarray:
  """Per-layer ``log10 MSE``: ``[L]`` for ``[L, d, k]`` arrays, lists or dicts."""
  pairs = _pairs(W, W_true)
  if pairs is None:
    return jax.vmap(layer_w_error)(jnp.asarray(W), jnp.asarray(W_true))
  return jnp.stack([layer_w_error(a, b) for a, b in pairs])


def w_error(W: Layers, W_true: Layers):
  """W-Error (Eq. 8): mean over layers of ``log10 MSE(W_true - W)``.

  Args:
    W: recovered weights: one layer (a 2-D array, or a conv kernel of any
      rank other than 3), a batch ``[L, d, k]`` of same-shape layers, or a
      list / dict of layers.
    W_true: the pre-fine-tuning weights, same structure.

  Returns:
    Scalar float32.

  >>> import jax.numpy as jnp
  >>> float(w_error(jnp.zeros((2, 2)), jnp.full((2, 2), 1e-3)))
  -6.0
  """
  return jnp.mean(layer_w_errors(W, W_true))


def detuning_loss(W_primes, W, rank):
  """Loss of Eq. 3 for the estimate ``W`` with the optimal ``M_i``.

  ``mean_i mean((W'_i - W - M_i)^2)`` with ``M_i = SVD_{r_i}(W'_i - W)``,
  i.e. the energy of the singular values of ``W'_i - W`` beyond ``r_i``.

  Args:
    W_primes: ``[n, d, k]``.
    W: ``[d, k]``.
    rank: int or ``n`` ints.
  """
  W_primes = jnp.asarray(W_primes, jnp.float32)
  n, d, k = W_primes.shape
  ranks = jnp.broadcast_to(jnp.asarray(rank), (n,))
  s = jnp.linalg.svd(W_primes - jnp.asarray(W, jnp.float32)[None],
                     compute_uv=False)
  tail = jnp.where(jnp.arange(s.shape[-1])[None] >= ranks[:, None], s, 0.0)
  return jnp.mean(jnp.sum(tail * tail, axis=-1)) / (d * k)
