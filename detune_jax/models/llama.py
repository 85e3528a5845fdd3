"""The Llama / Mistral family in Flax NNX: HF's ``LlamaForCausalLM`` and
``MistralForCausalLM`` as one port.

Pre-norm decoder layers with RMSNorm, rotary position embeddings with the
config's ``rope_theta`` (SmolLM2 uses 1e5, Llama 2 and Mistral 1e4) and its
``linear`` or ``llama3`` (Llama 3.1) scaling,
grouped-query attention (``num_key_value_heads``), the SwiGLU MLP
``down(silu(gate(x)) * up(x))``, Mistral's sliding window, and a tied or
untied LM head, all read from ``config.json``; a config key that changes the
maths in a way the port does not follow is refused. Parameters keep HF names
and ``[out, in]`` layouts (:data:`NAME_TABLE`), so a recovered or LoRA-merged
``q_proj`` loads as it is written.

The model runs with or without a key/value cache (:class:`Cache`): given
one, the tokens are written into it at ``index`` and attend over every slot
the key mask marks, which is what the jitted generation loop of
:mod:`~detune_jax.models.generation` builds on.

>>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
...                   num_hidden_layers=2, num_attention_heads=4,
...                   num_key_value_heads=2)
>>> model = Llama(cfg)
>>> model(jnp.zeros((1, 5), jnp.int32)).shape
(1, 5, 32)
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from detune_jax.io.errors import BadInputError
from detune_jax.models import checkpoint, layers

# NNX attribute paths are HF's own names without the ``model.`` prefix, so
# the table is nearly the identity; it stays the one place that knows it.
NAME_TABLE: checkpoint.NameTable = (
    ("embed_tokens.weight", "model.embed_tokens.weight"),
    ("layers.{i}.input_layernorm.weight",
     "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.post_attention_layernorm.weight",
     "model.layers.{i}.post_attention_layernorm.weight"),
    *((f"layers.{{i}}.self_attn.{p}.{w}",
       f"model.layers.{{i}}.self_attn.{p}.{w}")
      for p in ("q_proj", "k_proj", "v_proj", "o_proj")
      for w in ("weight", "bias")),
    *((f"layers.{{i}}.mlp.{p}.{w}", f"model.layers.{{i}}.mlp.{p}.{w}")
      for p in ("gate_proj", "up_proj", "down_proj")
      for w in ("weight", "bias")),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)

# Buffers older checkpoints carry that are not parameters.
IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

# HF names of the attention projections: the paper's LoRA targets.
ATTENTION_TARGETS = (
    r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.weight",)

# Config keys of other families, or options, that change the maths and that
# the port does not implement: refused unless absent, null or the value here.
_UNSUPPORTED = {
    "partial_rotary_factor": 1.0,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "logits_scaling": None,
    "query_pre_attn_scalar": None,
    "use_sliding_window": False,
    "use_qk_norm": False,
    "qk_layernorm": False,
    "embedding_multiplier": None,
    "residual_multiplier": None,
    "attention_multiplier": None,
    "no_rope_layers": None,
}


# Rotary scalings the port follows, with the parameters each needs (as
# transformers' ``modeling_rope_utils`` reads them).
_ROPE_PARAMETERS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}


class LlamaConfig(NamedTuple):
  """The fields of HF's ``LlamaConfig`` / ``MistralConfig`` the maths uses.

  ``sliding_window``: each token attends to itself and the
  ``sliding_window - 1`` before it (Mistral); ``None``: to all before it.
  """
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: Optional[int] = None
  head_dim: Optional[int] = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  sliding_window: Optional[int] = None
  attention_bias: bool = False
  mlp_bias: bool = False
  bos_token_id: Optional[int] = None
  eos_token_id: Tuple[int, ...] = ()
  pad_token_id: Optional[int] = None
  # ``(("rope_type", "linear" | "llama3"), (parameter, value), ...)``
  # sorted, or None: unscaled rotary embeddings.
  rope_scaling: Optional[Tuple[Tuple[str, object], ...]] = None

  @property
  def kv_heads(self) -> int:
    return self.num_key_value_heads or self.num_attention_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf(cls, config: Mapping,
              source: str = "config.json") -> "LlamaConfig":
    """From an HF ``config.json`` dict; refuses what the port does not do.

    Reads the rotary settings from either layout transformers has used
    (top-level ``rope_theta``/``rope_scaling``, or ``rope_parameters``).
    """
    model_type = config.get("model_type")
    if model_type not in ("llama", "mistral"):
      raise BadInputError(source, f"model_type {model_type!r}, expected "
                          "'llama' or 'mistral' (wrong architecture)")
    act = config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
      raise BadInputError(source, f"hidden_act {act!r} is not supported "
                          "(only 'silu')")
    for key, ok in _UNSUPPORTED.items():
      if config.get(key) not in (None, ok):
        raise BadInputError(source, f"{key}={config[key]!r} is not "
                            "supported by the Llama/Mistral port")
    if config.get("layer_types") and len(set(config["layer_types"])) > 1:
      raise BadInputError(source, "layer_types mixes attention kinds "
                          f"({sorted(set(config['layer_types']))}); not "
                          "supported")
    rope = dict(config.get("rope_scaling") or {})
    rope.update(config.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_PARAMETERS:
      raise BadInputError(source, f"rope scaling {rope_type!r} is not "
                          f"supported (only {sorted(_ROPE_PARAMETERS)})")
    missing = [k for k in _ROPE_PARAMETERS[rope_type] if k not in rope]
    if missing:
      raise BadInputError(source, f"rope scaling {rope_type!r} without "
                          f"{missing}")
    scaling = None if rope_type == "default" else tuple(sorted(
        [("rope_type", rope_type)]
        + [(k, float(rope[k])) for k in _ROPE_PARAMETERS[rope_type]]))
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    eos = config.get("eos_token_id")
    eos = () if eos is None else tuple(np.atleast_1d(eos).astype(int).tolist())
    window = config.get("sliding_window") if model_type == "mistral" else None
    fields = {f: config[f] for f in cls._fields
              if f in config and config[f] is not None
              and f not in ("rope_theta", "eos_token_id", "sliding_window",
                            "rope_scaling")}
    return cls(**fields, rope_theta=float(theta), eos_token_id=eos,
               sliding_window=None if window is None else int(window),
               rope_scaling=scaling)


class RMSNorm(nnx.Module):
  """``x / rms(x) * weight``, the statistics in float32 as HF computes
  them, the product in the input's dtype."""

  def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
    self.weight = nnx.Param(jnp.zeros((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return self.weight[...] * y.astype(x.dtype)


def inverse_frequencies(dim: int, theta: float,
                        scaling: Optional[Tuple] = None) -> np.ndarray:
  """The rotary embedding's ``[dim / 2]`` inverse frequencies, scaled as
  ``scaling`` (:attr:`LlamaConfig.rope_scaling`) says: ``linear`` divides
  them by ``factor``; ``llama3`` divides the low frequencies by ``factor``,
  keeps the high ones and interpolates between (Llama 3.1)."""
  inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  s = dict(scaling or ())
  kind = s.get("rope_type", "default")
  if kind == "linear":
    inv_freq = inv_freq / s["factor"]
  elif kind == "llama3":
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def rope_tables(positions: jax.Array, dim: int, theta: float,
                scaling: Optional[Tuple] = None
                ) -> Tuple[jax.Array, jax.Array]:
  """``cos, sin [..., dim]`` of the rotary embedding at integer
  ``positions``, in float32 (HF's layout: the frequencies twice over)."""
  inv_freq = jnp.asarray(inverse_frequencies(dim, theta, scaling))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], -1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x [b, t, heads, dim]`` by ``cos, sin [b, t, dim]`` (HF's
  rotate-half convention, not the interleaved one)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
  cos, sin = cos[:, :, None], sin[:, :, None]
  return (x.astype(jnp.float32) * cos
          + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class LayerCache(NamedTuple):
  """One layer's keys and values, ``[b, slots, kv_heads, head_dim]``."""
  k: jax.Array
  v: jax.Array


class Cache(NamedTuple):
  """Every layer's keys and values, and which slots hold real tokens.

  Attributes:
    layers: one :class:`LayerCache` per decoder layer.
    key_mask: ``[b, slots]``, 1 where a slot holds a token of the sequence
      (not padding, not yet written).
  """
  layers: Tuple[LayerCache, ...]
  key_mask: jax.Array

  @classmethod
  def empty(cls, config: LlamaConfig, batch: int, slots: int,
            dtype=jnp.float32) -> "Cache":
    shape = (batch, slots, config.kv_heads, config.dim_per_head)
    zeros = lambda: jnp.zeros(shape, dtype)
    return cls(tuple(LayerCache(zeros(), zeros())
                     for _ in range(config.num_hidden_layers)),
               jnp.zeros((batch, slots), jnp.int32))


def visible(q_slots: jax.Array, k_slots: jax.Array,
                   key_mask: jax.Array, window: Optional[int]) -> jax.Array:
  """``[b, 1, 1, t, s]`` booleans: query at slot ``q_slots[i]`` may attend
  to key slot ``k_slots[j]``: causal, a real token, inside the window."""
  allowed = k_slots[None, :] <= q_slots[:, None]
  if window is not None:
    allowed &= k_slots[None, :] > q_slots[:, None] - window
  allowed = allowed[None] & key_mask[:, None, :].astype(bool)
  return allowed[:, None, None]


class Attention(nnx.Module):
  """Grouped-query attention with rotary embeddings (HF's
  ``LlamaAttention``)."""

  def __init__(self, c: LlamaConfig, *, dtype=jnp.float32):
    self.heads, self.kv_heads, self.head_dim = (
        c.num_attention_heads, c.kv_heads, c.dim_per_head)
    if self.heads % self.kv_heads:
      raise ValueError(f"{self.heads} heads are not a multiple of "
                       f"{self.kv_heads} key/value heads")
    q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
    bias = c.attention_bias
    self.q_proj = layers.Linear(c.hidden_size, q, bias=bias, dtype=dtype)
    self.k_proj = layers.Linear(c.hidden_size, kv, bias=bias, dtype=dtype)
    self.v_proj = layers.Linear(c.hidden_size, kv, bias=bias, dtype=dtype)
    self.o_proj = layers.Linear(q, c.hidden_size, bias=bias, dtype=dtype)

  def __call__(self, x, cos, sin, mask, cache: Optional[LayerCache],
               index) -> Tuple[jax.Array, Optional[LayerCache]]:
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype),
                                              index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype),
                                              index, axis=1)
      cache = LayerCache(k, v)
    groups = self.heads // self.kv_heads
    q = q.reshape(b, t, self.kv_heads, groups, self.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32)
    scores = scores * (self.head_dim ** -0.5)
    # The most negative float rather than -inf: a padding query with no key
    # to attend gets a uniform row, never NaN.
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(x.dtype))
    return self.o_proj(out.reshape(b, t, -1)), cache


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, c: LlamaConfig, *, dtype=jnp.float32):
    bias = c.mlp_bias
    self.gate_proj = layers.Linear(c.hidden_size, c.intermediate_size,
                                   bias=bias, dtype=dtype)
    self.up_proj = layers.Linear(c.hidden_size, c.intermediate_size,
                                 bias=bias, dtype=dtype)
    self.down_proj = layers.Linear(c.intermediate_size, c.hidden_size,
                                   bias=bias, dtype=dtype)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm: ``h = x + attn(norm1(x))``, ``y = h + mlp(norm2(h))``."""

  def __init__(self, c: LlamaConfig, *, dtype=jnp.float32):
    self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
    self.self_attn = Attention(c, dtype=dtype)
    self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps,
                                            dtype=dtype)
    self.mlp = MLP(c, dtype=dtype)

  def __call__(self, x, cos, sin, mask, cache, index):
    a, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache,
                              index)
    h = x + a
    return h + self.mlp(self.post_attention_layernorm(h)), cache


class Llama(nnx.Module):
  """HF's ``LlamaForCausalLM`` / ``MistralForCausalLM``."""

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32):
    c = self.config = config
    self.embed_tokens = layers.Embedding(c.vocab_size, c.hidden_size,
                                         dtype=dtype)
    self.layers = nnx.List([DecoderLayer(c, dtype=dtype)
                            for _ in range(c.num_hidden_layers)])
    self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
    self.lm_head = (None if c.tie_word_embeddings else
                    layers.Linear(c.hidden_size, c.vocab_size, bias=False,
                                  dtype=dtype))

  def hidden(self, input_ids: jax.Array, positions: Optional[jax.Array] = None,
             attention_mask: Optional[jax.Array] = None,
             cache: Optional[Cache] = None, index=0
             ) -> Tuple[jax.Array, Optional[Cache]]:
    """The final (normed) hidden states ``[b, t, hidden]``, and the cache.

    Args:
      input_ids: ``[b, t]`` token ids.
      positions: ``[b, t]`` rotary positions (default ``index + arange(t)``;
        left-padded batches pass each row's own count of real tokens).
      attention_mask: without a cache, ``[b, t]`` (1: token, 0: padding);
        with one, ignored: ``cache.key_mask`` says which slots are tokens,
        and must already mark the ``t`` slots being written.
      cache: keys and values of earlier slots; the new ones are written at
        slots ``[index, index + t)``.
      index: the first slot of these tokens (a traced scalar is fine).

    Returns:
      ``(hidden, cache)``, the cache updated (``None`` when not given).
    """
    b, t = input_ids.shape
    q_slots = index + jnp.arange(t)
    if positions is None:
      positions = jnp.broadcast_to(q_slots, (b, t))
    if cache is None:
      key_mask = (jnp.ones((b, t), jnp.int32) if attention_mask is None
                  else attention_mask)
      k_slots = q_slots
    else:
      key_mask = cache.key_mask
      k_slots = jnp.arange(key_mask.shape[1])
    mask = visible(q_slots, k_slots, key_mask,
                             self.config.sliding_window)
    cos, sin = rope_tables(positions, self.config.dim_per_head,
                           self.config.rope_theta, self.config.rope_scaling)
    x = self.embed_tokens(input_ids)
    new_layers = []
    for i, layer in enumerate(self.layers):
      x, lc = layer(x, cos, sin, mask,
                    None if cache is None else cache.layers[i], index)
      new_layers.append(lc)
    x = self.norm(x)
    if cache is not None:
      cache = Cache(tuple(new_layers), cache.key_mask)
    return x, cache

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Next-token logits ``[..., vocab]`` (float32) of final hidden states."""
    w = (self.embed_tokens.weight if self.lm_head is None
         else self.lm_head.weight)[...]
    return jnp.einsum("...i,vi->...v", hidden, w.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)

  def __call__(self, input_ids: jax.Array,
               attention_mask: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None) -> jax.Array:
    """Logits ``[b, t, vocab]`` of a whole sequence, no cache (HF's
    ``forward`` without ``past_key_values``)."""
    if positions is None and attention_mask is not None:
      positions = positions_of(attention_mask)
    h, _ = self.hidden(input_ids, positions, attention_mask)
    return self.logits(h)



def positions_of(attention_mask: jax.Array) -> jax.Array:
  """Rotary positions of a left-padded batch: each token's count of real
  tokens before it, as HF's ``generate`` computes them (padding gets 1,
  unused)."""
  pos = jnp.cumsum(attention_mask, -1) - 1
  return jnp.where(attention_mask > 0, pos, 1)


def _tensors_for(tensors: Mapping[str, np.ndarray]) -> dict:
  """HF names as the table has them: a headless ``LlamaModel`` checkpoint
  (no ``model.`` prefix) gets one."""
  tensors = dict(tensors)
  if "model.embed_tokens.weight" not in tensors and \
      "embed_tokens.weight" in tensors:
    tensors = {("model." + n if not n.startswith("lm_head.") else n): v
               for n, v in tensors.items()}
  return tensors


def load(path: str, *, dtype=jnp.float32,
         config: Optional[Mapping] = None) -> Llama:
  """A :class:`Llama` from an HF directory (one file or shards), a
  safetensors file or an orbax checkpoint, in ``dtype``; ``config``: the HF
  config dict when ``path`` has no ``config.json`` beside it. Each tensor is
  cast as it is read from its memory map, so only one copy is held."""
  return from_tensors(checkpoint.read_tensors(path),
                      checkpoint.read_config(path, config), dtype=dtype,
                      source=path)


def from_tensors(tensors: Mapping[str, np.ndarray], config: Mapping, *,
                 dtype=jnp.float32, source: str = "tensors") -> Llama:
  """A :class:`Llama` from HF-named tensors and an HF config dict, checked
  as :func:`load` checks a checkpoint (``source`` names it in errors)."""
  cfg = LlamaConfig.from_hf(config, source=source)
  tensors = _tensors_for(tensors)
  ignore = IGNORED
  if cfg.tie_word_embeddings:
    # Some tied checkpoints also store the head (a copy of the embedding).
    ignore += (r"lm_head\.weight",)
  model = nnx.eval_shape(lambda: Llama(cfg, dtype=dtype))
  return checkpoint.load_params(model, tensors, NAME_TABLE, source=source,
                                dtype=dtype, ignore=ignore)
