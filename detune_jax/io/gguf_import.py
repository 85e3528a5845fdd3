"""A llama.cpp GGUF model as an HF Llama model directory, in float32.

:func:`import_gguf` reads a ``.gguf`` file with the ``gguf`` package (its
own parser: nothing is unpickled) and writes an HF directory that
transformers' ``LlamaForCausalLM`` and the ``tokenizers`` library load:

* ``model.safetensors``: every tensor dequantised to float32 (whatever
  ``gguf.quants.dequantize`` knows: F32, F16, BF16, Q4_0 ... Q8_0, the
  K-quants, the IQ types), under HF Llama names and in HF's ``[out, in]``
  layout. llama.cpp's converter permutes the rows of q and k (and of their
  biases) into its interleaved rope layout; that permutation is undone, so
  the weights are HF's exactly (up to the quantisation the file holds);
* ``config.json`` and ``generation_config.json`` from the ``llama.*`` and
  ``tokenizer.ggml.*`` metadata;
* ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template)
  rebuilt from ``tokenizer.ggml.*``: byte-level BPE (``gpt2`` models with
  the pre-tokenizers listed in :data:`BPE_PRE`) and SentencePiece BPE with
  byte fallback (``llama`` models). Other tokenizers are skipped with a
  warning: the weights and config are still written.

Only what HF's Llama computes is accepted: any other architecture, rope
scaling, experts, rope frequency tensors, or metadata this module does not
know is refused with :class:`BadInputError`, never guessed at.

Tensors are dequantised and written one at a time into a safetensors file
whose header is fixed up front, so a model needs about one float32 tensor
of memory beyond the memory-mapped GGUF file. Everything is written into a
temporary sibling of the destination that is renamed into place at the
end, so a failed import leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from detune_jax.io.errors import BadInputError
from detune_jax.io.safetensors_io import SafetensorsWriter

GGUF_MAGIC = b"GGUF"

# GGUF tensor names -> HF Llama names; {i} is the block.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_down.bias": "mlp.down_proj.bias",
}
ATTN_BIASES = ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias")
MLP_BIASES = ("ffn_gate.bias", "ffn_up.bias", "ffn_down.bias")

# ``llama.*`` metadata read below; any other ``llama.*`` key is refused, as
# it may change the maths in a way this module does not follow.
KNOWN_KEYS = frozenset(
    "llama." + k for k in (
        "context_length", "embedding_length", "block_count",
        "feed_forward_length", "attention.head_count",
        "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
        "attention.key_length", "attention.value_length", "rope.freq_base",
        "rope.dimension_count", "vocab_size", "rope.scaling.type",
        "rope.scaling.factor", "rope.scale_linear", "rope.scaling.attn_factor",
        "rope.scaling.original_context_length", "rope.scaling.finetuned",
        "expert_count", "expert_used_count"))

# llama.cpp's token types (``tokenizer.ggml.token_type``).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2_REGEX = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
              r"|\s+(?!\S)")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
                r"|\s+")
# llama.cpp's fallback when a file names no pre-tokenizer ("default"): these
# regexes split in turn, each keeping what it does not match.
DEFAULT_REGEXES = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+",
                   r"[0-9][0-9][0-9]")

# tokenizer.ggml.pre of byte-level BPE models -> (pre-tokenizer kind,
# ignore_merges, add_bos when the file does not say, clean_up_spaces), as
# llama.cpp's llama-vocab.cpp reads them.
BPE_PRE = {
    "gpt2": ("gpt2", False, False, True),
    "gpt-2": ("gpt2", False, False, True),
    "smollm": ("smollm", False, False, False),
    "llama-bpe": ("llama3", True, True, True),
    "llama3": ("llama3", True, True, True),
    "llama-v3": ("llama3", True, True, True),
    "default": ("default", False, False, True),
}


class ImportResult(NamedTuple):
  tensors: int          # tensors written to model.safetensors
  warnings: List[str]   # one line each: what was skipped or approximated


def is_gguf(path: str) -> bool:
  """Whether ``path`` is to be read as GGUF: named ``*.gguf`` (whether it
  exists or not), or a file starting with GGUF's magic."""
  if path.lower().endswith(".gguf"):
    return True
  if not os.path.isfile(path):
    return False
  with open(path, "rb") as f:
    return f.read(4) == GGUF_MAGIC


def import_gguf(src: str, dest: str) -> ImportResult:
  """Writes the GGUF model ``src`` as an HF Llama directory ``dest``.

  Args:
    src: a ``.gguf`` file (one file; split GGUFs are refused).
    dest: the directory to create; must not exist.

  Returns:
    The number of tensors written and the warnings (e.g. a tokenizer that
    could not be rebuilt).

  Raises:
    BadInputError: ``src`` is not a readable GGUF file, or holds something
      HF's Llama cannot express; ``dest`` exists.
  """
  if os.path.lexists(dest):
    raise BadInputError(dest, "already exists; not overwriting it")
  reader = _open(src)
  fields = _Fields(reader, src)
  config = _config(fields)
  plan = _plan(reader, fields, config, src)
  tokenizer_json, tokenizer_config, warnings = _tokenizer(
      fields, config, src)
  parent = os.path.dirname(os.path.abspath(dest))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
  try:
    _write_weights(plan, os.path.join(tmp, "model.safetensors"), src)
    generation = _generation_config(config)  # takes _stop_ids out
    _write_json(tmp, "config.json", config)
    _write_json(tmp, "generation_config.json", generation)
    if tokenizer_json is not None:
      with open(os.path.join(tmp, "tokenizer.json"), "w",
                encoding="utf-8") as f:
        f.write(tokenizer_json)
      _write_json(tmp, "tokenizer_config.json", tokenizer_config)
    else:
      _write_chat_template(tmp, tokenizer_config.get("chat_template"))
    os.replace(tmp, dest)
    tmp = None
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  return ImportResult(len(plan), warnings)


def _open(src: str):
  """The ``gguf.GGUFReader`` of ``src``; anything unreadable is bad input."""
  import gguf  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(src):
    raise BadInputError(src, "no such file")
  with open(src, "rb") as f:
    magic = f.read(4)
  if magic != GGUF_MAGIC:
    raise BadInputError(src, "not a GGUF file (no GGUF magic at the start)")
  try:
    reader = gguf.GGUFReader(src)
  except Exception as e:  # the parser raises many types on damaged files
    raise BadInputError(src, f"truncated or corrupt GGUF file "
                        f"({type(e).__name__}: {e})") from None
  if reader.byte_order != "I":
    # gguf.quants reads tensor data in the machine's byte order.
    raise BadInputError(src, "GGUF of the other byte order (big-endian) is "
                        "not supported")
  return reader


class _Fields:
  """Typed access to a GGUF file's metadata; wrong types are bad input."""

  def __init__(self, reader, src: str):
    import gguf  # pylint: disable=g-import-not-at-top
    self.t = gguf.GGUFValueType
    self.fields = reader.fields
    self.src = src

  def __contains__(self, key: str) -> bool:
    return key in self.fields

  def keys(self):
    return self.fields.keys()

  def get(self, key: str, kind: str, default=None):
    """The value of ``key`` as ``kind`` ("int", "float", "str", "bool",
    "list"), or ``default`` when absent."""
    field = self.fields.get(key)
    if field is None:
      return default
    t = self.t
    ints = (t.UINT8, t.INT8, t.UINT16, t.INT16, t.UINT32, t.INT32, t.UINT64,
            t.INT64)
    want = {"int": ints, "float": ints + (t.FLOAT32, t.FLOAT64),
            "str": (t.STRING,), "bool": (t.BOOL,), "list": (t.ARRAY,)}[kind]
    if not field.types or field.types[0] not in want:
      raise BadInputError(self.src, f"metadata {key} is "
                          f"{[x.name for x in field.types]}, expected {kind}")
    try:
      value = field.contents()
    except (ValueError, IndexError) as e:  # bad UTF-8, short arrays
      raise BadInputError(self.src, f"metadata {key} unreadable: {e}") from None
    if kind == "int":
      return int(value)
    if kind == "float":
      # The shortest decimal that is the same float32: 1e-05, not
      # 9.999999747378752e-06 (HF computes in float32 either way).
      return float(str(np.float32(value)))
    return value

  def require(self, key: str, kind: str):
    value = self.get(key, kind)
    if value is None:
      raise BadInputError(self.src, f"metadata {key} is missing")
    return value


def _refuse_metadata(fields: _Fields):
  """What changes the maths beyond what HF's Llama computes."""
  src = fields.src
  arch = fields.require("general.architecture", "str")
  if arch != "llama":
    raise BadInputError(src, f"architecture {arch!r} is not supported (only "
                        "'llama', which llama.cpp also writes Mistral as)")
  kind = fields.get("general.type", "str", "model")
  if kind != "model":
    raise BadInputError(src, f"general.type is {kind!r}: not a model (LoRA "
                        "adapters and projectors are not supported)")
  if fields.get("split.count", "int", 1) > 1:
    raise BadInputError(src, "is one part of a split GGUF; merge the parts "
                        "with llama-gguf-split --merge first")
  for key in fields.keys():
    if key.startswith("llama.") and key not in KNOWN_KEYS:
      raise BadInputError(src, f"metadata {key} is not supported (it may "
                          "change the model in a way HF's Llama cannot say)")
  scaling = fields.get("llama.rope.scaling.type", "str", "none")
  if scaling != "none":
    raise BadInputError(src, f"rope scaling {scaling!r} is not supported")
  for key in ("llama.rope.scaling.factor", "llama.rope.scale_linear"):
    # llama.cpp applies a linear factor whatever the scaling type says.
    if fields.get(key, "float", 1.0) not in (0.0, 1.0):
      raise BadInputError(src, f"{key} = {fields.get(key, 'float')} (rope "
                          "scaling) is not supported")
  if fields.get("llama.rope.scaling.attn_factor", "float", 1.0) != 1.0:
    raise BadInputError(src, "llama.rope.scaling.attn_factor is not supported")
  if fields.get("llama.expert_count", "int", 0) > 0:
    raise BadInputError(src, "mixture-of-experts models are not supported")


def _config(fields: _Fields) -> Dict:
  """HF ``LlamaConfig`` fields (``vocab_size`` and the biases and tying are
  filled in by :func:`_plan`, from the tensors)."""
  _refuse_metadata(fields)
  src = fields.src
  hidden = fields.require("llama.embedding_length", "int")
  heads = fields.require("llama.attention.head_count", "int")
  kv_heads = fields.get("llama.attention.head_count_kv", "int", heads)
  if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
    raise BadInputError(src, f"{heads} attention heads and {kv_heads} "
                        "key/value heads: not a grouped-query layout")
  head_dim = fields.get("llama.attention.key_length", "int")
  if head_dim is None:
    if hidden % heads:
      raise BadInputError(src, f"embedding_length {hidden} is not a multiple "
                          f"of head_count {heads}")
    head_dim = hidden // heads
  value_dim = fields.get("llama.attention.value_length", "int", head_dim)
  if value_dim != head_dim:
    raise BadInputError(src, f"key_length {head_dim} != value_length "
                        f"{value_dim} is not supported")
  rot = fields.get("llama.rope.dimension_count", "int", head_dim)
  if rot != head_dim:
    raise BadInputError(src, f"rope.dimension_count {rot} != head size "
                        f"{head_dim} (partial rotary) is not supported")
  if head_dim % 2:
    raise BadInputError(src, f"odd head size {head_dim}")
  theta = fields.get("llama.rope.freq_base", "float", 10000.0)
  tok = "tokenizer.ggml."
  eos = fields.get(tok + "eos_token_id", "int")
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": None,
      "hidden_size": hidden,
      "intermediate_size": fields.require("llama.feed_forward_length", "int"),
      "num_hidden_layers": fields.require("llama.block_count", "int"),
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": fields.require("llama.context_length", "int"),
      "rms_norm_eps": fields.require("llama.attention.layer_norm_rms_epsilon",
                                     "float"),
      # transformers 5 reads rope_parameters; older ones rope_theta.
      "rope_theta": theta,
      "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "tie_word_embeddings": True,
      "bos_token_id": fields.get(tok + "bos_token_id", "int"),
      "eos_token_id": eos,
      "pad_token_id": fields.get(tok + "padding_token_id", "int"),
      "initializer_range": 0.02,
      "pretraining_tp": 1,
      "use_cache": True,
      "torch_dtype": "float32",
      "dtype": "float32",
      # Not HF config fields: what llama.cpp also stops generating at.
      "_stop_ids": [i for i in (eos, fields.get(tok + "eot_token_id", "int"),
                                fields.get(tok + "eom_token_id", "int"))
                    if i is not None],
  }


class _Item(NamedTuple):
  hf_name: str
  shape: Tuple[int, ...]     # HF shape: [out, in] for matrices
  tensor: Optional[object]   # gguf ReaderTensor; None: zeros (a bias)
  unpermute: int             # heads to undo llama.cpp's rope permutation
                             # for; 0: none


def _plan(reader, fields: _Fields, config: Dict, src: str) -> List[_Item]:
  """What to write, in HF order, after checking every name, shape and type;
  fills ``config``'s vocab_size, biases and tying."""
  import gguf  # pylint: disable=g-import-not-at-top
  layers = config["num_hidden_layers"]
  by_name = {}
  for t in reader.tensors:
    name = t.name
    if name == "rope_freqs.weight":
      raise BadInputError(src, "has rope frequency factors (Llama 3.1-style "
                          "rope scaling), which HF's default rope cannot "
                          "express", tensor=name)
    known = name in GLOBAL_NAMES
    if name.startswith("blk."):
      index, _, rest = name[4:].partition(".")
      known = (rest in BLOCK_NAMES and index.isdigit()
               and str(int(index)) == index and int(index) < layers)
    if not known:
      raise BadInputError(src, "tensor not supported (not part of a Llama "
                          "model)", tensor=name)
    by_name[name] = t

  def need(name):
    if name not in by_name:
      raise BadInputError(src, "missing tensor", tensor=name)
    return by_name[name]

  embed = need("token_embd.weight")
  if len(embed.shape) != 2:
    raise BadInputError(src, f"shape {_hf_shape(embed)}, expected "
                        "[vocab, hidden]", tensor=embed.name)
  vocab = _hf_shape(embed)[0]
  h, f = config["hidden_size"], config["intermediate_size"]
  q = config["num_attention_heads"] * config["head_dim"]
  kv = config["num_key_value_heads"] * config["head_dim"]
  n_vocab = fields.get("llama.vocab_size", "int", vocab)
  if n_vocab != vocab:
    raise BadInputError(src, f"llama.vocab_size {n_vocab} but the embedding "
                        f"has {vocab} rows", tensor=embed.name)
  attn_bias = any(f"blk.{i}.{b}" in by_name
                  for i in range(layers) for b in ATTN_BIASES)
  mlp_bias = any(f"blk.{i}.{b}" in by_name
                 for i in range(layers) for b in MLP_BIASES)
  config.update(vocab_size=vocab, attention_bias=attn_bias,
                mlp_bias=mlp_bias,
                tie_word_embeddings="output.weight" not in by_name)

  shapes = {
      "attn_norm.weight": (h,), "ffn_norm.weight": (h,),
      "attn_q.weight": (q, h), "attn_q.bias": (q,),
      "attn_k.weight": (kv, h), "attn_k.bias": (kv,),
      "attn_v.weight": (kv, h), "attn_v.bias": (kv,),
      "attn_output.weight": (h, q), "attn_output.bias": (h,),
      "ffn_gate.weight": (f, h), "ffn_gate.bias": (f,),
      "ffn_up.weight": (f, h), "ffn_up.bias": (f,),
      "ffn_down.weight": (h, f), "ffn_down.bias": (h,),
  }
  permute = {"attn_q": config["num_attention_heads"],
             "attn_k": config["num_key_value_heads"]}
  order = [("token_embd.weight", (vocab, h))]
  for i in range(layers):
    for part in BLOCK_NAMES:
      if (part in ATTN_BIASES and not attn_bias) or (
          part in MLP_BIASES and not mlp_bias):
        continue
      order.append((f"blk.{i}.{part}", shapes[part]))
  order.append(("output_norm.weight", (h,)))
  if "output.weight" in by_name:
    order.append(("output.weight", (vocab, h)))

  plan = []
  for name, shape in order:
    if name.startswith("blk."):
      index, _, part = name[4:].partition(".")
      hf_name = f"model.layers.{index}.{BLOCK_NAMES[part]}"
      heads = permute.get(part.partition(".")[0], 0)
    else:
      part, hf_name, heads = name, GLOBAL_NAMES[name], 0
    t = by_name.get(name)
    if t is None:
      if part.endswith(".bias"):  # zeros: HF has all biases or none
        plan.append(_Item(hf_name, shape, None, 0))
        continue
      need(name)
    if _hf_shape(t) != shape:
      raise BadInputError(src, f"shape {list(_hf_shape(t))}, expected "
                          f"{list(shape)} from the metadata", tensor=name)
    _check_type(t, src, gguf)
    plan.append(_Item(hf_name, shape, t, heads))
  return plan


def _hf_shape(t) -> Tuple[int, ...]:
  # GGUF lists dimensions fastest first (ne = [in, out]).
  return tuple(int(d) for d in reversed(t.shape.tolist()))


def _check_type(t, src: str, gguf):
  """Refuses a tensor type ``gguf`` cannot dequantise, before anything is
  written (dequantising its first row is cheap and says for sure)."""
  try:
    _dequantize(t, gguf, rows=1)
  except NotImplementedError:
    raise BadInputError(src, f"tensor type {t.tensor_type.name} cannot be "
                        "dequantised", tensor=t.name) from None
  except (ValueError, IndexError) as e:  # rows not whole blocks, ...
    raise BadInputError(src, f"cannot dequantise: {e}",
                        tensor=t.name) from None


def _dequantize(t, gguf, rows: Optional[int] = None) -> np.ndarray:
  """``t`` as float32 in HF shape (the first ``rows`` rows if given)."""
  data = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim else t.data
  if rows is not None:
    data = data[:rows]
  kind = gguf.GGMLQuantizationType
  if t.tensor_type == kind.F64:  # gguf.quants has no F64; round it
    out = np.asarray(data, np.float32)
  else:
    out = gguf.quants.dequantize(data, t.tensor_type)
  if rows is not None:
    return out
  return np.asarray(out, np.float32).reshape(_hf_shape(t))


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py), which
  is ``w.reshape(heads, 2, rows // heads // 2, *rest).swapaxes(1, 2)``: each
  head's rows from HF's two halves to llama.cpp's interleaved pairs."""
  rest = w.shape[1:]
  return (w.reshape(heads, w.shape[0] // heads // 2, 2, *rest)
          .swapaxes(1, 2).reshape(w.shape))


def _write_weights(plan: Sequence[_Item], path: str, src: str):
  import gguf  # pylint: disable=g-import-not-at-top
  writer = SafetensorsWriter(
      path, [(it.hf_name, "F32", it.shape) for it in plan], {"format": "pt"})
  try:
    for it in plan:
      if it.tensor is None:
        writer.write(it.hf_name, np.zeros(it.shape, np.float32))
        continue
      try:
        w = _dequantize(it.tensor, gguf)
      except (ValueError, IndexError) as e:
        raise BadInputError(src, f"cannot dequantise: {e}",
                            tensor=it.tensor.name) from None
      if it.unpermute:
        w = _unpermute(w, it.unpermute)
      writer.write(it.hf_name, w)
      del w  # one float32 tensor at a time
    writer.commit()
  except BaseException:
    writer.abort()
    raise


def _write_json(out_dir: str, name: str, obj: Dict):
  with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write("\n")


def _write_chat_template(out_dir: str, template):
  """``chat_template.jinja`` (transformers reads it too): the template's
  home when there is no tokenizer_config.json to carry it."""
  if isinstance(template, list):
    template = next((t["template"] for t in template
                     if t["name"] == "default"), None)
  if template is not None:
    with open(os.path.join(out_dir, "chat_template.jinja"), "w",
              encoding="utf-8") as f:
      f.write(template)


def _generation_config(config: Dict) -> Dict:
  """bos/eos/pad ids; eos lists every token llama.cpp stops at (eos, eot,
  eom) when they differ. Takes ``_stop_ids`` out of ``config``."""
  stops = list(dict.fromkeys(config.pop("_stop_ids")))
  out = {"bos_token_id": config["bos_token_id"],
         "eos_token_id": stops[0] if len(stops) == 1 else stops or None,
         "pad_token_id": config["pad_token_id"]}
  return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------- tokenizer


def _tokenizer(fields: _Fields, config: Dict, src: str
               ) -> Tuple[Optional[str], Dict, List[str]]:
  """``(tokenizer.json text or None, tokenizer_config.json, warnings)``."""
  tok = "tokenizer.ggml."
  model = fields.get(tok + "model", "str")
  tokens = fields.get(tok + "tokens", "list")
  warnings = []
  template = fields.get("tokenizer.chat_template", "str")
  named = {}
  for name in fields.get("tokenizer.chat_templates", "list") or []:
    text = fields.get(f"tokenizer.chat_template.{name}", "str")
    if text is not None:
      named[name] = text
  if named:
    template = ([{"name": "default", "template": template}]
                if template is not None else []) + [
                    {"name": n, "template": t} for n, t in named.items()]
  token_config = {"chat_template": template}
  if model is None or not tokens:
    warnings.append(f"{src}: no tokenizer in the file; no tokenizer.json "
                    "written")
    return None, token_config, warnings
  if len(tokens) > config["vocab_size"]:
    raise BadInputError(src, f"{len(tokens)} tokens but the embedding has "
                        f"{config['vocab_size']} rows")
  types = fields.get(tok + "token_type", "list") or [NORMAL] * len(tokens)
  if len(types) != len(tokens):
    raise BadInputError(src, f"{len(types)} token types for {len(tokens)} "
                        "tokens")

  def token(key):
    i = fields.get(tok + key, "int")
    if i is None:
      return None
    if not 0 <= i < len(tokens):
      raise BadInputError(src, f"{tok}{key} {i} is not a token id")
    return tokens[i]

  specials = {name: token(key) for name, key in (
      ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}
  if len(set(tokens)) != len(tokens):
    warnings.append(f"{src}: the vocabulary repeats token strings, which a "
                    f"tokenizer.json cannot hold; no tokenizer.json written")
    return None, token_config, warnings
  if model == "gpt2":
    pre = fields.get(tok + "pre", "str", "default")
    if pre not in BPE_PRE:
      warnings.append(f"{src}: pre-tokenizer {pre!r} of the byte-level BPE "
                      "tokenizer is not supported; no tokenizer.json written")
      return None, token_config, warnings
    kind, ignore_merges, add_bos, clean = BPE_PRE[pre]
    if kind == "default":
      warnings.append(f"{src}: the pre-tokenizer is llama.cpp's fallback "
                      "('default', or none named); tokenizer.json splits "
                      "text as llama.cpp then does, which may not be as the "
                      "model's own tokenizer did")
    add_space_prefix = False
  elif model == "llama":
    add_bos, clean, ignore_merges, kind = True, False, False, "spm"
    add_space_prefix = fields.get(tok + "add_space_prefix", "bool", True)
  else:
    warnings.append(f"{src}: tokenizer model {model!r} is not supported "
                    "(only 'gpt2' and 'llama'); no tokenizer.json written")
    return None, token_config, warnings
  add_bos = fields.get(tok + "add_bos_token", "bool", add_bos)
  add_eos = fields.get(tok + "add_eos_token", "bool", False)
  if (add_bos and specials["bos_token"] is None) or (
      add_eos and specials["eos_token"] is None):
    raise BadInputError(src, "adds a bos/eos token that it does not name")

  if kind == "spm":
    scores = fields.get(tok + "scores", "list")
    if scores is None or len(scores) != len(tokens):
      raise BadInputError(src, "a SentencePiece vocabulary needs one score "
                          "per token (tokenizer.ggml.scores)")
    merges = spm_merges(tokens, scores)
  else:
    merges = []
    for m in fields.get(tok + "merges", "list") or []:
      # As llama.cpp splits them: at the first space after the first byte.
      at = m.find(" ", 1)
      if at < 0:
        raise BadInputError(src, f"merge {m!r} is not two tokens")
      merges.append((m[:at], m[at + 1:]))
  try:
    tokenizer = _build(tokens, types, merges, kind, ignore_merges,
                       add_space_prefix, specials, add_bos, add_eos)
  except Exception as e:  # tokenizers raises its own exception types
    warnings.append(f"{src}: the tokenizer could not be rebuilt "
                    f"({type(e).__name__}: {e}); no tokenizer.json written")
    return None, token_config, warnings
  token_config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      **{k: v for k, v in specials.items() if v is not None},
      "add_bos_token": add_bos,
      "add_eos_token": add_eos,
      "clean_up_tokenization_spaces": clean,
      "model_max_length": config["max_position_embeddings"],
      **token_config,
  }
  if template is None:
    del token_config["chat_template"]
  return tokenizer.to_str(pretty=True), token_config, warnings


def spm_merges(tokens: Sequence[str], scores: Sequence[float]
               ) -> List[Tuple[str, str]]:
  """BPE merges equivalent to SentencePiece's (and llama.cpp's) merging by
  score: every split of every token into two tokens, the best-scored
  results first, as transformers' ``generate_merges`` orders them.

  >>> spm_merges(["a", "b", "c", "ab", "abc"], [0, 0, 0, -1, -2])
  [('a', 'b'), ('ab', 'c')]
  """
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = []
  for piece, score in zip(tokens, scores):
    local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
             if piece[:k] in vocab and piece[k:] in vocab]
    local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.extend(local)
  merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
  return [(a, b) for a, b, _ in merges]


def _build(tokens, types, merges, kind, ignore_merges, add_space_prefix,
           specials, add_bos, add_eos):
  """The ``tokenizers.Tokenizer``; raises if the ids do not come out as the
  file has them."""
  from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models,
                          normalizers, pre_tokenizers, processors)
  vocab = {t: i for i, t in enumerate(tokens)}
  if kind == "spm":
    model = models.BPE(vocab=vocab, merges=merges,
                       unk_token=specials["unk_token"], byte_fallback=True,
                       fuse_unk=True)
  else:
    model = models.BPE(vocab=vocab, merges=merges,
                       ignore_merges=ignore_merges)
  tokenizer = Tokenizer(model)
  if kind == "spm":
    # llama.cpp prefixes a space after every special token too, as this
    # normaliser does (it runs on each piece between added tokens).
    norm = [normalizers.Replace(" ", "▁")]
    if add_space_prefix:
      norm.insert(0, normalizers.Prepend("▁"))
    tokenizer.normalizer = normalizers.Sequence(norm)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(),
             decoders.Fuse()]
    if add_space_prefix:
      steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
  else:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                          use_regex=kind in ("gpt2",
                                                             "smollm"))
    if kind == "gpt2":
      pre = byte_level
    elif kind == "smollm":
      pre = pre_tokenizers.Sequence([
          pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif kind == "llama3":
      pre = pre_tokenizers.Sequence([
          pre_tokenizers.Split(Regex(LLAMA3_REGEX), "isolated"), byte_level])
    else:
      pre = pre_tokenizers.Sequence([
          pre_tokenizers.Split(Regex(r), "isolated") for r in DEFAULT_REGEXES
      ] + [byte_level])
    tokenizer.pre_tokenizer = pre
    tokenizer.decoder = decoders.ByteLevel()
  # Control tokens are special (skipped when decoding with
  # skip_special_tokens); user-defined ones are plain added tokens, matched
  # whole like llama.cpp matches both.
  tokenizer.add_special_tokens([
      AddedToken(t, special=True, normalized=False)
      for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)])
  tokenizer.add_tokens([
      AddedToken(t, special=False, normalized=False)
      for t, ty in zip(tokens, types) if ty == USER_DEFINED])
  for t, i in vocab.items():
    if tokenizer.token_to_id(t) != i:
      raise ValueError(f"token {t!r} got id {tokenizer.token_to_id(t)}, "
                       f"not {i}")
  post = [] if kind == "spm" else [processors.ByteLevel(trim_offsets=False)]
  if add_bos or add_eos:
    bos, eos = specials["bos_token"], specials["eos_token"]
    single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (
        f" {eos}:0" if add_eos else "")
    pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (
        f" {eos}:1" if add_eos else "")
    post.append(processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(t, vocab[t]) for t in
                        ([bos] if add_bos else []) + ([eos] if add_eos
                                                       else [])]))
  if len(post) == 1:
    tokenizer.post_processor = post[0]
  elif post:
    tokenizer.post_processor = processors.Sequence(post)
  return tokenizer
