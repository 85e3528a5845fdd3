"""Small synthetic LoRA fine-tuned models on disk (demo and tests)."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import ml_dtypes
import numpy as np

from detune_jax.io.models import write_model

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
  kernels ``[o, i, kh, kw]`` through their ``[o, i*kh*kw]`` matrix); tensors
  in ``frozen`` are the same in all models.

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
    seed: numpy seed.
    lora_scale: size of ``B A`` relative to ``W``'s entries.

  Returns:
    ``([ft_0, ..., ft_{n-1}], base)`` directory paths.
  """
  layers = DEFAULT_LAYERS if layers is None else layers
  frozen = DEFAULT_FROZEN if frozen is None else frozen
  ranks = [int(ranks)] * n if np.isscalar(ranks) else [int(r) for r in ranks]
  rng = np.random.default_rng(seed)
  base = {}
  for name, shape in list(layers.items()) + list(frozen.items()):
    base[name] = (rng.standard_normal(shape) * 0.02).astype(np.float32)
  dt = np.dtype(dtype)
  base_dir = os.path.join(out_dir, "base")
  write_model(base_dir, {k: v.astype(dt) for k, v in base.items()}, shards)
  paths = []
  for i in range(n):
    tensors = {}
    for name in base:
      W = base[name].astype(dt).astype(np.float32)
      if name in layers:
        d, k = W.shape[0], int(np.prod(W.shape[1:]))
        B = rng.standard_normal((d, ranks[i])).astype(np.float32)
        A = rng.standard_normal((ranks[i], k)).astype(np.float32)
        delta = (B @ A) * (0.02 * lora_scale / np.sqrt(ranks[i]))
        W = W + delta.reshape(W.shape)
      tensors[name] = W.astype(dt)
    path = os.path.join(out_dir, f"ft_{i}")
    write_model(path, tensors, shards)
    paths.append(path)
  return paths, base_dir


BF16 = ml_dtypes.bfloat16
