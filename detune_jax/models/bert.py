"""BERT in Flax NNX, and the sentence-transformers pipeline of all-MiniLM-L6-v2.

:class:`Bert` is HF's ``BertModel`` (post-norm encoder, absolute position
embeddings, optional tanh pooler); :class:`SentenceEncoder` adds what
sentence-transformers runs after it for all-MiniLM-L6-v2 (mean pooling over
the attention mask, L2 normalisation) and the model's own tokenizer
(``tokenizer.json``, read with the ``tokenizers`` library). Parameters keep
HF names and layouts through :data:`NAME_TABLE`, so recovered weights load
as they are written.

>>> cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
...                  num_attention_heads=2, intermediate_size=16)
>>> model = Bert(cfg)
>>> model(jnp.zeros((1, 4), jnp.int32))["last_hidden_state"].shape
(1, 4, 8)
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from detune_jax.io.errors import BadInputError
from detune_jax.models import checkpoint, layers
from detune_jax.models.batching import Batcher

NAME_TABLE: checkpoint.NameTable = (
    ("word_embeddings.weight", "embeddings.word_embeddings.weight"),
    ("position_embeddings.weight", "embeddings.position_embeddings.weight"),
    ("token_type_embeddings.weight",
     "embeddings.token_type_embeddings.weight"),
    ("embeddings_norm.weight", "embeddings.LayerNorm.weight"),
    ("embeddings_norm.bias", "embeddings.LayerNorm.bias"),
    ("layers.{i}.attn.query.weight",
     "encoder.layer.{i}.attention.self.query.weight"),
    ("layers.{i}.attn.query.bias", "encoder.layer.{i}.attention.self.query.bias"),
    ("layers.{i}.attn.key.weight", "encoder.layer.{i}.attention.self.key.weight"),
    ("layers.{i}.attn.key.bias", "encoder.layer.{i}.attention.self.key.bias"),
    ("layers.{i}.attn.value.weight",
     "encoder.layer.{i}.attention.self.value.weight"),
    ("layers.{i}.attn.value.bias", "encoder.layer.{i}.attention.self.value.bias"),
    ("layers.{i}.attn_out.weight", "encoder.layer.{i}.attention.output.dense.weight"),
    ("layers.{i}.attn_out.bias", "encoder.layer.{i}.attention.output.dense.bias"),
    ("layers.{i}.norm1.weight",
     "encoder.layer.{i}.attention.output.LayerNorm.weight"),
    ("layers.{i}.norm1.bias", "encoder.layer.{i}.attention.output.LayerNorm.bias"),
    ("layers.{i}.mlp.inner.weight", "encoder.layer.{i}.intermediate.dense.weight"),
    ("layers.{i}.mlp.inner.bias", "encoder.layer.{i}.intermediate.dense.bias"),
    ("layers.{i}.mlp.outer.weight", "encoder.layer.{i}.output.dense.weight"),
    ("layers.{i}.mlp.outer.bias", "encoder.layer.{i}.output.dense.bias"),
    ("layers.{i}.norm2.weight", "encoder.layer.{i}.output.LayerNorm.weight"),
    ("layers.{i}.norm2.bias", "encoder.layer.{i}.output.LayerNorm.bias"),
    ("pooler.weight", "pooler.dense.weight"),
    ("pooler.bias", "pooler.dense.bias"),
)

# Buffers some BERT checkpoints carry that are not parameters.
IGNORED = (r"embeddings\.position_ids",)


class BertConfig(NamedTuple):
  """The fields of HF's ``BertConfig`` that the maths depends on."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pooler: bool = True

  @classmethod
  def from_hf(cls, config: Mapping, source: str = "config.json",
              pooler: bool = True) -> "BertConfig":
    """From an HF ``config.json`` dict; refuses what the port does not do."""
    _refuse(config, source, model_type="bert")
    fields = {f: config[f] for f in cls._fields if f in config}
    if fields.get("hidden_act", "gelu") not in layers.ACTIVATIONS:
      raise BadInputError(source, f"hidden_act {fields['hidden_act']!r} is "
                          f"not supported ({sorted(layers.ACTIVATIONS)})")
    return cls(**fields, pooler=pooler)


def _refuse(config: Mapping, source: str, model_type: str):
  """Config keys that change the maths in ways the port does not follow."""
  got = config.get("model_type")
  if got != model_type:
    raise BadInputError(source, f"model_type {got!r}, expected "
                        f"{model_type!r} (wrong architecture)")
  checks = {"position_embedding_type": "absolute", "is_decoder": False,
            "add_cross_attention": False}
  for key, want in checks.items():
    if key in config and config[key] not in (want, None):
      raise BadInputError(source, f"{key}={config[key]!r} is not supported "
                          f"(only {want!r})")
  if config.get("embedding_size", config.get("hidden_size")) != config.get(
      "hidden_size"):
    raise BadInputError(source, "embedding_size differs from hidden_size "
                        "(factorised embeddings are not supported)")


class Bert(nnx.Module):
  """HF's ``BertModel``: embeddings, post-norm encoder, optional pooler."""

  def __init__(self, config: BertConfig, *, dtype=jnp.float32):
    c = config
    self.config = c
    self.word_embeddings = layers.Embedding(c.vocab_size, c.hidden_size,
                                            dtype=dtype)
    self.position_embeddings = layers.Embedding(
        c.max_position_embeddings, c.hidden_size, dtype=dtype)
    self.token_type_embeddings = layers.Embedding(
        c.type_vocab_size, c.hidden_size, dtype=dtype)
    self.embeddings_norm = layers.LayerNorm(c.hidden_size, c.layer_norm_eps,
                                            dtype=dtype)
    self.layers = nnx.List([
        layers.EncoderLayer(c.hidden_size, c.num_attention_heads,
                            c.intermediate_size, c.hidden_act,
                            c.layer_norm_eps, pre_norm=False, dtype=dtype)
        for _ in range(c.num_hidden_layers)])
    self.pooler = (layers.Linear(c.hidden_size, c.hidden_size, dtype=dtype)
                   if c.pooler else None)

  def __call__(self, input_ids: jax.Array,
               attention_mask: Optional[jax.Array] = None,
               token_type_ids: Optional[jax.Array] = None) -> Dict:
    """Hidden states of ``input_ids [b, t]``.

    Returns:
      ``{"hidden_states": [embeddings, layer 1, ...], "last_hidden_state",
      "pooler_output"}`` (the last where the model has a pooler), as HF's
      ``BertModel(..., output_hidden_states=True)``.
    """
    t = input_ids.shape[1]
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = (self.word_embeddings(input_ids)
         + self.token_type_embeddings(token_type_ids)
         + self.position_embeddings(jnp.arange(t))[None])
    x = self.embeddings_norm(x)
    hidden = [x]
    for layer in self.layers:
      x = layer(x, attention_mask)
      hidden.append(x)
    out = {"hidden_states": hidden, "last_hidden_state": x}
    if self.pooler is not None:
      out["pooler_output"] = jnp.tanh(self.pooler(x[:, 0]))
    return out


def load(path: str, *, dtype=jnp.float32,
         config: Optional[Mapping] = None) -> Bert:
  """A :class:`Bert` from an HF directory, a safetensors file or an orbax
  checkpoint (``config``: the HF config dict when ``path`` has none beside
  it). A ``bert.`` prefix (task checkpoints) is taken off; a checkpoint
  without a pooler gives a model without one."""
  tensors = checkpoint.read_tensors(path)
  return from_tensors(tensors, checkpoint.read_config(path, config),
                      dtype=dtype, source=path)


def from_tensors(tensors: Mapping[str, np.ndarray], config: Mapping, *,
                 dtype=jnp.float32, source: str = "tensors") -> Bert:
  """A :class:`Bert` from HF-named tensors in memory and an HF config dict
  (e.g. a base with some matrices replaced); checked as :func:`load`
  checks a checkpoint, ``source`` naming it in errors."""
  tensors = checkpoint.strip_prefix(dict(tensors), "bert.")
  cfg = BertConfig.from_hf(config, source=source,
                           pooler="pooler.dense.weight" in tensors)
  model = nnx.eval_shape(lambda: Bert(cfg, dtype=dtype))
  return checkpoint.load_params(model, tensors, NAME_TABLE, source=source,
                                dtype=dtype, ignore=IGNORED)


class SentenceEncoder:
  """all-MiniLM-L6-v2 as sentence-transformers runs it, in JAX.

  Tokenises with the model's ``tokenizer.json``, truncates to
  ``max_seq_length`` (``sentence_bert_config.json``), runs :class:`Bert`
  under ``jax.jit`` on batches padded to a few bucketed lengths (one compile
  per bucket, not per batch), mean-pools over the attention mask and
  L2-normalises, as the model's ``modules.json`` says.
  """

  def __init__(self, model: Bert, tokenizer_dir: str, *, batch_size: int = 32,
               max_seq_length: Optional[int] = None):
    import tokenizers  # pylint: disable=g-import-not-at-top
    file = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.exists(file):
      raise BadInputError(tokenizer_dir, "no tokenizer.json")
    self.tokenizer = tokenizers.Tokenizer.from_file(file)
    self.tokenizer.no_padding()
    st = _sentence_config(tokenizer_dir)
    limit = max_seq_length or st.get("max_seq_length") or \
        model.config.max_position_embeddings
    self.tokenizer.enable_truncation(int(limit))
    self.normalize = st.get("normalize", True)
    self.pooling = st.get("pooling", "mean")
    self.batcher = Batcher(batch_size, max_length=int(limit))
    self.dim = model.config.hidden_size
    graphdef, state = nnx.split(model)
    self._graphdef = graphdef
    self._state = state
    self._embed = jax.jit(
        lambda state, ids, mask: _pool(nnx.merge(graphdef, state)(
            ids, mask)["last_hidden_state"], mask, self.pooling,
            self.normalize))

  def use(self, model: Bert):
    """Embeds with ``model``'s weights from now on, through the programs
    already compiled (``model`` must have the same architecture)."""
    graphdef, state = nnx.split(model)
    if graphdef != self._graphdef:
      raise ValueError("a model of another architecture than the encoder's")
    self._state = state

  def tokenize(self, texts: Sequence[str]) -> List[List[int]]:
    return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """Sentence embeddings ``[len(texts), hidden]`` (float32 numpy)."""
    ids = self.tokenize(texts)
    out = np.zeros((len(ids), self.dim), np.float32)
    for index, batch, mask in self.batcher.batches(ids):
      emb = self._embed(self._state, batch, mask)
      out[index] = np.asarray(emb, np.float32)[:len(index)]
    return out


def _pool(hidden, mask, pooling: str, normalize: bool):
  hidden = hidden.astype(jnp.float32)
  if pooling == "cls":
    pooled = hidden[:, 0]
  else:
    m = mask[..., None].astype(jnp.float32)
    pooled = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
  if normalize:
    pooled = pooled / jnp.maximum(
        jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
  return pooled


def _sentence_config(model_dir: str) -> dict:
  """What sentence-transformers' own files say about the pipeline: the
  sequence limit, the pooling mode and whether it L2-normalises."""
  out = {}
  path = os.path.join(model_dir, "sentence_bert_config.json")
  if os.path.exists(path):
    with open(path) as f:
      out["max_seq_length"] = json.load(f).get("max_seq_length")
  modules = os.path.join(model_dir, "modules.json")
  if os.path.exists(modules):
    with open(modules) as f:
      mods = json.load(f)
    types = [m.get("type", "") for m in mods]
    out["normalize"] = any(t.endswith("Normalize") for t in types)
    for m in mods:
      if m.get("type", "").endswith("Pooling"):
        out["pooling"] = _pooling_mode(os.path.join(model_dir, m["path"]))
  return out


def _pooling_mode(pool_dir: str) -> str:
  path = os.path.join(pool_dir, "config.json")
  if not os.path.exists(path):
    return "mean"
  with open(path) as f:
    cfg = json.load(f)
  modes = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
  if modes == ["pooling_mode_mean_tokens"]:
    return "mean"
  if modes == ["pooling_mode_cls_token"]:
    return "cls"
  raise BadInputError(path, f"pooling {modes} is not supported (mean or cls)")
