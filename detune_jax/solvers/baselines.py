"""Baselines of the paper's tables: Mean-LoRA and LoRA-FT."""

from __future__ import annotations

import jax.numpy as jnp

from detune_jax.metrics import layer_w_error


def mean_lora(W_primes):
  """Mean-LoRA: the average of the fine-tuned matrices.

  Args:
    W_primes: ``[n, d, k]`` or ``[L, n, d, k]``.

  Returns:
    float32 ``[d, k]`` or ``[L, d, k]``.
  """
  W_primes = jnp.asarray(W_primes, jnp.float32)
  n = W_primes.shape[-3]
  total = W_primes[..., 0, :, :]
  for i in range(1, n):
    total = total + W_primes[..., i, :, :]
  return total / n


def lora_ft_w_error(W_primes, W_true):
  """LoRA-FT: the W-Error of the fine-tuned models themselves.

  The mean over the n fine-tuned versions of ``log10 MSE(W'_i - W_true)``
  for one layer ``[n, d, k]``.
  """
  W_primes = jnp.asarray(W_primes, jnp.float32)
  return jnp.mean(jnp.stack([layer_w_error(W_primes[i], W_true)
                             for i in range(W_primes.shape[0])]))
