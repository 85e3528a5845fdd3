"""Transformer blocks shared by the encoder ports (BERT, ViT).

Every matrix is kept in the HF (PyTorch) layout, ``weight [out, in]``, so a
recovered or LoRA-merged tensor maps 1:1 onto a parameter and the name tables
of the ports are the only place that knows HF names. Parameters are created
as zeros of the right shape; the ports build them under ``nnx.eval_shape`` and
fill them from a checkpoint, so no random initialisation is ever computed.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

# Activations by their HF config name. "gelu" is the exact (erf) GELU, as in
# PyTorch; the tanh approximation has its own names.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


class Linear(nnx.Module):
  """``y = x W^T + b`` with ``W [out, in]`` (HF layout)."""

  def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
               dtype=jnp.float32):
    self.weight = nnx.Param(jnp.zeros((out_features, in_features), dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum("...i,oi->...o", x, self.weight[...])
    if self.bias is not None:
      y = y + self.bias[...]
    return y


class LayerNorm(nnx.Module):
  """Layer norm over the last axis, with HF's ``weight``/``bias`` names."""

  def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
    self.weight = nnx.Param(jnp.zeros((dim,), dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    # Statistics in float32 even for bf16 activations, as PyTorch does.
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.weight[...] + self.bias[...]).astype(x.dtype)


class Embedding(nnx.Module):
  """A lookup table ``weight [num, dim]``."""

  def __init__(self, num: int, dim: int, *, dtype=jnp.float32):
    self.weight = nnx.Param(jnp.zeros((num, dim), dtype))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.weight[...], ids, axis=0)


class SelfAttention(nnx.Module):
  """Multi-head self-attention with separate query/key/value projections."""

  def __init__(self, dim: int, heads: int, *, bias: bool = True,
               dtype=jnp.float32):
    if dim % heads:
      raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
    self.heads = heads
    self.query = Linear(dim, dim, bias=bias, dtype=dtype)
    self.key = Linear(dim, dim, bias=bias, dtype=dtype)
    self.value = Linear(dim, dim, bias=bias, dtype=dtype)

  def __call__(self, x: jax.Array,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """``x [b, t, dim]``, ``mask [b, t]`` (1: attend, 0: padding)."""
    b, t, dim = x.shape
    split = lambda y: y.reshape(b, t, self.heads, dim // self.heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(
        jnp.asarray(dim // self.heads, x.dtype))
    if mask is not None:
      scores = jnp.where(mask[:, None, None, :].astype(bool), scores,
                         jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, dim)


class MLP(nnx.Module):
  """``out(act(inner(x)))``: the transformer feed-forward block."""

  def __init__(self, dim: int, hidden: int, act: str, *, dtype=jnp.float32):
    self.inner = Linear(dim, hidden, dtype=dtype)
    self.outer = Linear(hidden, dim, dtype=dtype)
    self.act = ACTIVATIONS[act]

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.outer(self.act(self.inner(x)))


class EncoderLayer(nnx.Module):
  """A transformer encoder layer, post-norm (BERT) or pre-norm (ViT).

  Post-norm: ``h = LN1(x + O(attn(x)))``, ``y = LN2(h + mlp(h))``.
  Pre-norm: ``h = x + O(attn(LN1(x)))``, ``y = h + mlp(LN2(h))``.
  """

  def __init__(self, dim: int, heads: int, hidden: int, act: str, eps: float,
               *, pre_norm: bool, qkv_bias: bool = True, dtype=jnp.float32):
    self.pre_norm = pre_norm
    self.attn = SelfAttention(dim, heads, bias=qkv_bias, dtype=dtype)
    self.attn_out = Linear(dim, dim, dtype=dtype)
    self.norm1 = LayerNorm(dim, eps, dtype=dtype)
    self.mlp = MLP(dim, hidden, act, dtype=dtype)
    self.norm2 = LayerNorm(dim, eps, dtype=dtype)

  def __call__(self, x: jax.Array,
               mask: Optional[jax.Array] = None) -> jax.Array:
    if self.pre_norm:
      h = x + self.attn_out(self.attn(self.norm1(x), mask))
      return h + self.mlp(self.norm2(h))
    h = self.norm1(x + self.attn_out(self.attn(x, mask)))
    return self.norm2(h + self.mlp(h))
