"""Seeded synthetic LoRA fine-tunes ``W'_i = W + B_i A_i`` for tests and demos."""

from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp


def lora_stack(seed: int, d: int, k: int, n: int,
               rank: Union[int, Sequence[int]], *, scale: float = 0.02,
               dtype=jnp.float32):
  """A random base ``W [d, k]`` and ``n`` merged LoRA fine-tunes of it.

  Entries of ``W``, ``B_i`` and ``A_i`` are Gaussian with standard deviation
  ``scale`` (about the size of real transformer weights); the merge is done in
  float32 and then cast to ``dtype`` (e.g. bfloat16, as releases are).

  Args:
    seed: PRNG seed.
    d, k: layer shape.
    n: number of fine-tunes.
    rank: LoRA rank, or one per fine-tune.
    scale: standard deviation of the entries.
    dtype: dtype of the returned stack (``W`` is returned in the same dtype).

  Returns:
    ``(W [d, k], W_primes [n, d, k])``.

  >>> W, W_primes = lora_stack(0, 8, 6, n=3, rank=2)
  >>> W_primes.shape
  (3, 8, 6)
  """
  ranks = [int(rank)] * n if isinstance(rank, int) else [int(r) for r in rank]
  if len(ranks) != n:
    raise ValueError(f"got {len(ranks)} ranks for n={n}")
  kw, kl = jax.random.split(jax.random.key(seed))
  W = jax.random.normal(kw, (d, k), jnp.float32) * scale
  if jnp.dtype(dtype) != jnp.float32:
    W = W.astype(dtype).astype(jnp.float32)  # the base is released in dtype too
  W_primes = []
  for i, r in enumerate(ranks):
    kb, ka = jax.random.split(jax.random.fold_in(kl, i))
    B = jax.random.normal(kb, (d, r), jnp.float32) * scale
    A = jax.random.normal(ka, (r, k), jnp.float32) * scale
    W_primes.append(W + B @ A)
  return W.astype(dtype), jnp.stack(W_primes).astype(dtype)
