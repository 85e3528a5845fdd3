"""ViT in Flax NNX, as HF's ``ViTModel`` and ``ViTForImageClassification``.

Patch embedding (a stride-``p`` convolution, done as a matmul on the image's
``p x p`` patches), CLS token, learned position embeddings, a pre-norm
encoder, the final layer norm, then the pooler and/or the classifier head as
the checkpoint has them. Sizes come from ``config.json``; parameters keep HF
names and layouts through :data:`NAME_TABLE`.

>>> cfg = ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
...                 intermediate_size=16, image_size=8, patch_size=4)
>>> out = ViT(cfg)(jnp.zeros((1, 3, 8, 8)))
>>> out["last_hidden_state"].shape, len(out["hidden_states"])
((1, 5, 8), 2)
"""

from __future__ import annotations

from typing import Dict, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from detune_jax.io.errors import BadInputError
from detune_jax.models import checkpoint, layers

NAME_TABLE: checkpoint.NameTable = (
    ("cls_token", "embeddings.cls_token"),
    ("position_embeddings", "embeddings.position_embeddings"),
    ("patch.weight", "embeddings.patch_embeddings.projection.weight"),
    ("patch.bias", "embeddings.patch_embeddings.projection.bias"),
    ("layers.{i}.norm1.weight", "encoder.layer.{i}.layernorm_before.weight"),
    ("layers.{i}.norm1.bias", "encoder.layer.{i}.layernorm_before.bias"),
    ("layers.{i}.attn.query.weight",
     "encoder.layer.{i}.attention.attention.query.weight"),
    ("layers.{i}.attn.query.bias",
     "encoder.layer.{i}.attention.attention.query.bias"),
    ("layers.{i}.attn.key.weight",
     "encoder.layer.{i}.attention.attention.key.weight"),
    ("layers.{i}.attn.key.bias", "encoder.layer.{i}.attention.attention.key.bias"),
    ("layers.{i}.attn.value.weight",
     "encoder.layer.{i}.attention.attention.value.weight"),
    ("layers.{i}.attn.value.bias",
     "encoder.layer.{i}.attention.attention.value.bias"),
    ("layers.{i}.attn_out.weight",
     "encoder.layer.{i}.attention.output.dense.weight"),
    ("layers.{i}.attn_out.bias", "encoder.layer.{i}.attention.output.dense.bias"),
    ("layers.{i}.norm2.weight", "encoder.layer.{i}.layernorm_after.weight"),
    ("layers.{i}.norm2.bias", "encoder.layer.{i}.layernorm_after.bias"),
    ("layers.{i}.mlp.inner.weight", "encoder.layer.{i}.intermediate.dense.weight"),
    ("layers.{i}.mlp.inner.bias", "encoder.layer.{i}.intermediate.dense.bias"),
    ("layers.{i}.mlp.outer.weight", "encoder.layer.{i}.output.dense.weight"),
    ("layers.{i}.mlp.outer.bias", "encoder.layer.{i}.output.dense.bias"),
    ("norm.weight", "layernorm.weight"),
    ("norm.bias", "layernorm.bias"),
    ("pooler.weight", "pooler.dense.weight"),
    ("pooler.bias", "pooler.dense.bias"),
    ("classifier.weight", "classifier.weight"),
    ("classifier.bias", "classifier.bias"),
)

# ViTModel's mask token (masked image modelling only) is not used here.
IGNORED = (r"embeddings\.mask_token",)


class ViTConfig(NamedTuple):
  """The fields of HF's ``ViTConfig`` that the maths depends on."""
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  qkv_bias: bool = True
  pooler: bool = False
  num_labels: int = 0

  @classmethod
  def from_hf(cls, config: Mapping, source: str = "config.json", *,
              pooler: bool, num_labels: int) -> "ViTConfig":
    """From an HF ``config.json`` dict; refuses what the port does not do."""
    if config.get("model_type") != "vit":
      raise BadInputError(source, f"model_type {config.get('model_type')!r}, "
                          "expected 'vit' (wrong architecture)")
    for key, want in (("pooler_act", "tanh"),
                      ("pooler_output_size", config.get("hidden_size"))):
      if config.get(key, want) != want:
        raise BadInputError(source, f"{key}={config[key]!r} is not supported")
    for key in ("image_size", "patch_size"):
      if not isinstance(config.get(key, 1), int):
        raise BadInputError(source, f"non-square {key} is not supported")
    fields = {f: config[f] for f in cls._fields if f in config}
    if fields.get("hidden_act", "gelu") not in layers.ACTIVATIONS:
      raise BadInputError(source, f"hidden_act {fields['hidden_act']!r} is "
                          f"not supported ({sorted(layers.ACTIVATIONS)})")
    return cls(**fields, pooler=pooler, num_labels=num_labels)


class ViT(nnx.Module):
  """HF's ViT: ``ViTModel`` with its pooler, or with a classifier head."""

  def __init__(self, config: ViTConfig, *, dtype=jnp.float32):
    c = config
    self.config = c
    patches = (c.image_size // c.patch_size) ** 2
    self.cls_token = nnx.Param(jnp.zeros((1, 1, c.hidden_size), dtype))
    self.position_embeddings = nnx.Param(
        jnp.zeros((1, patches + 1, c.hidden_size), dtype))
    self.patch = _PatchEmbedding(c.num_channels, c.hidden_size, c.patch_size,
                                 dtype=dtype)
    self.layers = nnx.List([
        layers.EncoderLayer(c.hidden_size, c.num_attention_heads,
                            c.intermediate_size, c.hidden_act,
                            c.layer_norm_eps, pre_norm=True,
                            qkv_bias=c.qkv_bias, dtype=dtype)
        for _ in range(c.num_hidden_layers)])
    self.norm = layers.LayerNorm(c.hidden_size, c.layer_norm_eps, dtype=dtype)
    self.pooler = (layers.Linear(c.hidden_size, c.hidden_size, dtype=dtype)
                   if c.pooler else None)
    self.classifier = (layers.Linear(c.hidden_size, c.num_labels, dtype=dtype)
                       if c.num_labels else None)

  def __call__(self, pixel_values: jax.Array) -> Dict:
    """Outputs for ``pixel_values [b, channels, size, size]`` (NCHW, as HF).

    Returns:
      ``{"hidden_states": [embeddings, layer 1, ...], "last_hidden_state"}``
      (after the final norm) plus ``"pooler_output"`` and/or ``"logits"``
      where the model has them, as HF with ``output_hidden_states=True``.
    """
    x = self.patch(pixel_values.astype(self.cls_token.dtype))
    cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embeddings[...]
    hidden = [x]
    for layer in self.layers:
      x = layer(x)
      hidden.append(x)
    x = self.norm(x)
    out = {"hidden_states": hidden, "last_hidden_state": x}
    if self.pooler is not None:
      out["pooler_output"] = jnp.tanh(self.pooler(x[:, 0]))
    if self.classifier is not None:
      out["logits"] = self.classifier(x[:, 0])
    return out


class _PatchEmbedding(nnx.Module):
  """A ``p x p``, stride-``p`` convolution (HF's ``projection``, weight
  ``[out, channels, p, p]``), computed as one matmul over the patches."""

  def __init__(self, channels: int, dim: int, patch: int, *, dtype):
    self.weight = nnx.Param(jnp.zeros((dim, channels, patch, patch), dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), dtype))
    self.patch = patch

  def __call__(self, images: jax.Array) -> jax.Array:
    b, c, h, w = images.shape
    p = self.patch
    if h % p or w % p:
      raise ValueError(f"image {h}x{w} is not a multiple of the patch {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = x.transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
    kernel = self.weight[...].reshape(self.weight.shape[0], -1)
    return jnp.einsum("bnk,ok->bno", x, kernel) + self.bias[...]


def load(path: str, *, dtype=jnp.float32,
         config: Optional[Mapping] = None) -> ViT:
  """A :class:`ViT` from an HF directory, a safetensors file or an orbax
  checkpoint (``config``: the HF config dict when ``path`` has none beside
  it). ``ViTModel`` checkpoints (no prefix, a pooler) and
  ``ViTForImageClassification`` ones (``vit.`` prefix, a classifier) both
  load; the head is built as the checkpoint has it."""
  tensors = checkpoint.strip_prefix(checkpoint.read_tensors(path), "vit.")
  hf = checkpoint.read_config(path, config)
  head = tensors.get("classifier.weight")
  cfg = ViTConfig.from_hf(hf, source=path,
                          pooler="pooler.dense.weight" in tensors,
                          num_labels=0 if head is None else head.shape[0])
  model = nnx.eval_shape(lambda: ViT(cfg, dtype=dtype))
  return checkpoint.load_params(model, tensors, NAME_TABLE, source=path,
                                dtype=dtype, ignore=IGNORED)
