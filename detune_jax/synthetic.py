"""Seeded synthetic LoRA fine-tunes ``W'_i = W + B_i A_i`` and their release.

:func:`lora_stack` is the one builder of synthetic stacks: tests, the demo's
model files (:func:`detune_jax.io.synthetic.make_lora_models`), the
benchmarks and the studies all draw from it. :func:`release` rounds float32
stacks to a release dtype, with or without the base on that dtype's grid.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["lora_stack", "release"]

Seed = Union[int, jax.Array]


def lora_stack(seed: Seed, d: int, k: int, n: int,
               rank: Union[int, Sequence[int]], *,
               layers: Optional[int] = None, shared: float = 0.0,
               scale: float = 0.02, lora_std: Optional[float] = None,
               dtype=jnp.float32) -> Tuple[jax.Array, jax.Array]:
  """A random base ``W`` and ``n`` merged LoRA fine-tunes of it.

  Entries of ``W``, ``B_i`` and ``A_i`` are Gaussian with standard deviation
  ``scale`` (about the size of real transformer weights); each merge is done
  in float32 and then cast to ``dtype`` (e.g. bfloat16, as releases are),
  with the base itself on that dtype's grid (:func:`release` with
  ``rebase``).

  The stack is written one fine-tune at a time into a buffer that each
  write takes over (donates), so building it takes its own size, the
  float32 base and one fine-tune's temporaries (a 4096x4096 stack of 12
  rank-64 fine-tunes peaked at 1.27x its size above the started runtime).
  Fine-tune ``i`` is drawn from its own key, so the first ``n`` fine-tunes
  of a larger ``n`` are the same, and ``n=0`` gives the base alone;
  likewise layer ``l`` of ``layers=L`` is the same for every ``L > l``, and
  layer 0 is the stack drawn without ``layers``.

  Args:
    seed: PRNG seed, or a ``jax.random.key``.
    d, k: layer shape.
    n: number of fine-tunes (0: the base alone).
    rank: LoRA rank, or one per fine-tune.
    layers: None, or a number of layers ``L``: a leading layer axis on ``W``
      and on the stack.
    shared: in ``[0, 1)``: each factor is ``sqrt(shared) * common +
      sqrt(1 - shared) * own``, the common factors drawn once (with the
      largest rank; a LoRA of rank ``r`` takes their first ``r``
      directions): correlated fine-tunes whose column and row spaces share
      directions, as fine-tunes on similar data do.
    scale: standard deviation of the entries of ``W`` (and of the factors
      unless ``lora_std`` is given).
    lora_std: None, or the standard deviation of the entries of each
      ``B_i A_i``: the factors' entries then have standard deviation
      ``sqrt(lora_std / sqrt(r_i))``.
    dtype: dtype of the returned arrays.

  Returns:
    ``(W, W_primes)``: ``W [d, k]`` and ``W_primes [n, d, k]``, or
    ``[L, d, k]`` and ``[L, n, d, k]`` with ``layers``; ``W`` in ``dtype``
    too.

  >>> W, W_primes = lora_stack(0, 8, 6, n=3, rank=2)
  >>> W_primes.shape
  (3, 8, 6)
  >>> W, W_primes = lora_stack(0, 8, 6, n=3, rank=(1, 2, 2), layers=4,
  ...                          shared=0.5, dtype=jnp.bfloat16)
  >>> W.shape, W_primes.shape, W_primes.dtype
  ((4, 8, 6), (4, 3, 8, 6), dtype(bfloat16))
  """
  ranks = [int(rank)] * n if isinstance(rank, int) else [int(r) for r in rank]
  if len(ranks) != n:
    raise ValueError(f"got {len(ranks)} ranks for n={n}")
  if not 0.0 <= shared < 1.0:
    raise ValueError(f"shared must be in [0, 1), got {shared}")
  dtype = jnp.dtype(dtype)
  lead = () if layers is None else (int(layers),)
  key = (jax.random.key(seed) if isinstance(seed, (int, np.integer))
         else seed)
  kw, kl = jax.random.split(key)
  W = jax.random.normal(kw, lead + (d, k), jnp.float32) * scale
  if dtype != jnp.float32:
    W = W.astype(dtype).astype(jnp.float32)  # the base is released in dtype too
  # The common factors' key comes from the base's: the draws without
  # ``shared`` stay as they were.
  kc = jax.random.fold_in(kw, 1)
  r_common = max(ranks) if shared else 0
  stack = jnp.zeros(lead + (n, d, k), dtype)
  for i, r in enumerate(ranks):
    factor = (scale, scale) if lora_std is None else (
        float(np.sqrt(lora_std / np.sqrt(r))),) * 2
    stack = _put_lora(stack, W, jax.random.fold_in(kl, i), i, kc, r=r,
                      factor=factor, shared=float(shared), r_common=r_common)
  return W.astype(dtype), stack


@functools.partial(jax.jit, static_argnames=("r", "factor", "shared",
                                             "r_common"), donate_argnums=(0,))
def _put_lora(stack, W, key, i, common_key, *, r, factor, shared, r_common):
  """Writes ``W + B_i A_i`` (in ``stack``'s dtype) into slot ``i`` of the
  donated ``stack``; with ``r_common`` > 0, the factors share
  ``common_key``'s factors of that rank with weight ``shared``."""
  lead, (d, k) = W.shape[:-2], W.shape[-2:]
  kb, ka = jax.random.split(key)
  # The barrier keeps XLA from fusing the scaling below into the normals'
  # program, which changes their last bits: the stack stays the one drawn
  # one operation at a time.
  B, A = jax.lax.optimization_barrier((
      jax.random.normal(kb, lead + (d, r), jnp.float32),
      jax.random.normal(ka, lead + (r, k), jnp.float32)))
  if r_common:
    kcb, kca = jax.random.split(common_key)
    cb = jax.random.normal(kcb, lead + (d, r_common), jnp.float32)[..., :r]
    ca = jax.random.normal(kca, lead + (r_common, k), jnp.float32)[..., :r, :]
    B = np.sqrt(shared) * cb + np.sqrt(1 - shared) * B
    A = np.sqrt(shared) * ca + np.sqrt(1 - shared) * A
  merged = (W + (B * factor[0]) @ (A * factor[1])).astype(stack.dtype)
  return jax.lax.dynamic_update_index_in_dim(stack, merged, i, axis=len(lead))


def release(W, W_primes, dtype, rebase: bool = True):
  """Casts a float32 base and fine-tunes to a release dtype (numpy).

  With ``rebase`` (fine-tunes made from the base as released): the base of
  a low-precision release is itself on that dtype's grid, and the
  fine-tunes are ``round(W + M_i)`` with ``M_i = W'_i - W`` from float32.
  Without: each is rounded on its own (``round(W)``, ``round(W'_i)``), as
  saving float32 fine-tunes of a float32 base in that dtype does.

  Args:
    W: the base, ``[d, k]`` or ``[L, d, k]``.
    W_primes: the fine-tunes, ``[n, d, k]`` or ``[L, n, d, k]``.
    dtype: the release dtype, e.g. ``"bfloat16"`` (``"float32"``: no
      rounding).
    rebase: see above.

  Returns:
    ``(W, W_primes)`` as numpy arrays of ``dtype``.

  >>> W, Wp = lora_stack(0, 8, 6, n=3, rank=2)
  >>> W16, Wp16 = release(W, Wp, "bfloat16")
  >>> str(W16.dtype), Wp16.shape
  ('bfloat16', (3, 8, 6))
  """
  W = np.asarray(W, np.float32)
  W_primes = np.asarray(W_primes, np.float32)
  dt = jnp.dtype(dtype)
  if dt == np.float32:
    return W, W_primes
  if not rebase:
    return W.astype(dt), W_primes.astype(dt)
  M = W_primes - W[..., None, :, :]
  W_low = W.astype(dt)
  W_primes_low = (W_low.astype(np.float32)[..., None, :, :] + M).astype(dt)
  return W_low, W_primes_low
