"""Small synthetic LoRA fine-tuned models on disk (demo and tests)."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import jax
import ml_dtypes
import numpy as np

from detune_jax.io.models import write_model
from detune_jax.synthetic import lora_stack

# Standard deviation of the base's entries (about that of real weights).
_SCALE = 0.02

DEFAULT_LAYERS = {
    **{f"encoder.layer.{i}.attention.{p}.weight": (256, 256)
       for i in range(3) for p in ("query", "value")},
    "head.conv.weight": (64, 32, 1, 1),
}
DEFAULT_FROZEN = {
    "embeddings.word_embeddings.weight": (512, 256),
    "embeddings.LayerNorm.weight": (256,),
    "embeddings.LayerNorm.bias": (256,),
    **{f"encoder.layer.{i}.attention.{p}.bias": (256,)
       for i in range(3) for p in ("query", "value")},
}


def make_lora_models(out_dir, *, n: int = 5,
                     ranks: Union[int, Sequence[int]] = 8,
                     layers: Optional[Dict[str, Tuple[int, ...]]] = None,
                     frozen: Optional[Dict[str, Tuple[int, ...]]] = None,
                     dtype=np.float32, shards: int = 1, seed: int = 0,
                     lora_scale: float = 1.0) -> Tuple[List[str], str]:
  """Writes a base model and ``n`` LoRA fine-tunes of it as model dirs.

  Every tensor in ``layers`` gets ``W + B_i A_i`` in model ``i`` (conv
  kernels ``[o, i, kh, kw]`` through their ``[o, i*kh*kw]`` matrix), drawn
  by :func:`detune_jax.synthetic.lora_stack` (from its own key, in the order
  of ``layers``); tensors in ``frozen`` are the same in all models.

  Args:
    out_dir: created; holds ``base/`` and ``ft_0/`` ... ``ft_{n-1}/``.
    n: number of fine-tuned models.
    ranks: LoRA rank, one for all or one per model.
    layers: fine-tuned tensor shapes (default: a few 256x256 attention
      layers and a 1x1 conv).
    frozen: untouched tensor shapes (embeddings, norms, biases).
    dtype: dtype of every tensor (e.g. ``ml_dtypes.bfloat16``); the LoRA is
      merged in float32 and then rounded, as a released model would be.
    shards: 1, or the number of ``model-0000i-of-0000n.safetensors`` shards.
    seed: PRNG seed.
    lora_scale: standard deviation of the entries of ``B_i A_i`` relative
      to ``W``'s.

  Returns:
    ``([ft_0, ..., ft_{n-1}], base)`` directory paths.
  """
  layers = DEFAULT_LAYERS if layers is None else layers
  frozen = DEFAULT_FROZEN if frozen is None else frozen
  ranks = [int(ranks)] * n if np.isscalar(ranks) else [int(r) for r in ranks]
  dt = np.dtype(dtype)
  key = jax.random.key(seed)
  base, fine_tunes = {}, {}
  for j, (name, shape) in enumerate(layers.items()):
    # Conv kernels [o, i, kh, kw] get their LoRA on the [o, i*kh*kw] matrix.
    d, k = shape[0], int(np.prod(shape[1:]))
    W, W_primes = lora_stack(jax.random.fold_in(key, j), d, k, n, ranks,
                             lora_std=_SCALE * lora_scale, dtype=dt)
    base[name] = np.asarray(W).reshape(shape)
    fine_tunes[name] = np.asarray(W_primes).reshape((n,) + tuple(shape))
  for j, (name, shape) in enumerate(frozen.items(), start=len(layers)):
    W = jax.random.normal(jax.random.fold_in(key, j), shape) * _SCALE
    base[name] = np.asarray(W.astype(dt))
  base_dir = os.path.join(out_dir, "base")
  write_model(base_dir, base, shards)
  paths = []
  for i in range(n):
    tensors = {name: fine_tunes[name][i] if name in fine_tunes else tensor
               for name, tensor in base.items()}
    path = os.path.join(out_dir, f"ft_{i}")
    write_model(path, tensors, shards)
    paths.append(path)
  return paths, base_dir


BF16 = ml_dtypes.bfloat16
