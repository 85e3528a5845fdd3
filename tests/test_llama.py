"""The Llama/Mistral port and its generation loop against transformers.

``*_vs_reference`` tests build ``LlamaForCausalLM`` (tied embeddings,
``rope_theta`` 5e4) and ``MistralForCausalLM`` (sliding window 5, shorter
than the sequences) from tiny random configs, save them as HF directories,
load those into the port and compare in float32: logits within 1e-4, and
greedy decoding token for token with ``generate``, with and without the
key/value cache, one prompt and a left-padded batch.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from flax import nnx

from detune_jax.io.errors import BadInputError
from detune_jax.models import generation, llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LOGITS_TOL = 1e-4
VOCAB = 64
EOS, PAD = 2, 0


def _tiny(kind):
  common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, eos_token_id=EOS,
                pad_token_id=PAD, initializer_range=0.5)
  if kind == "llama":
    cfg = transformers.LlamaConfig(num_key_value_heads=2, rope_theta=5e4,
                                   tie_word_embeddings=True, **common)
    return transformers.LlamaForCausalLM(cfg)
  cfg = transformers.MistralConfig(num_key_value_heads=1, sliding_window=5,
                                   **common)
  return transformers.MistralForCausalLM(cfg)


@pytest.fixture(scope="module", params=["llama", "mistral"])
def tiny(request, tmp_path_factory):
  """``(torch model, HF directory, port)``."""
  torch.manual_seed(0)
  model = _tiny(request.param).eval()
  path = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(path)
  return model, path, llama.load(path)


def test_config_is_read_as_transformers_wrote_it(tiny):
  _, path, port = tiny
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  c = port.config
  if hf["model_type"] == "llama":
    assert c.rope_theta == 5e4 and c.tie_word_embeddings
    assert port.lm_head is None and c.sliding_window is None
  else:
    assert c.sliding_window == 5 and port.lm_head is not None
  assert c.eos_token_id == (EOS,) and c.pad_token_id == PAD


def test_logits_vs_reference(tiny):
  model, _, port = tiny
  rng = np.random.RandomState(0)
  ids = rng.randint(3, VOCAB, (3, 13))
  mask = np.ones_like(ids)
  mask[1, :4] = 0  # left padding
  mask[2, :9] = 0
  with torch.no_grad():
    ref = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
  out = np.asarray(port(jnp.asarray(ids), jnp.asarray(mask)))
  ref = ref.numpy()
  valid = mask.astype(bool)
  assert np.abs(out[valid] - ref[valid]).max() <= LOGITS_TOL
  # The cache path gives the same logits, one token at a time.
  cache = llama.Cache.empty(port.config, 1, 13)
  cache = cache._replace(key_mask=jnp.ones((1, 13), jnp.int32))
  steps = []
  for i in range(13):
    h, cache = port.hidden(jnp.asarray(ids[:1, i:i + 1]), cache=cache,
                           index=i)
    steps.append(np.asarray(port.logits(h))[0, 0])
  assert np.abs(np.stack(steps) - ref[0]).max() <= LOGITS_TOL


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_decoding_vs_reference(tiny, use_cache):
  model, _, port = tiny
  prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
  for prompt in prompts:
    with torch.no_grad():
      ref = model.generate(torch.tensor([prompt]),
                           attention_mask=torch.ones(1, len(prompt),
                                                     dtype=torch.long),
                           max_new_tokens=20, do_sample=False,
                           use_cache=use_cache)[0, len(prompt):].tolist()
    out = generation.generate_ids(port, [prompt], max_new_tokens=20,
                                  batch_size=1, use_cache=use_cache)[0]
    assert out == ref
    assert len(set(out)) > 3  # a real test: not one token repeated
  # A left-padded batch, as generate pads it.
  ids = torch.tensor([[PAD] * 4 + prompts[1], prompts[0]])
  am = (ids != PAD).long()
  with torch.no_grad():
    ref = model.generate(ids, attention_mask=am, max_new_tokens=20,
                         do_sample=False, use_cache=use_cache)[:, 7:]
  out = generation.generate_ids(port, prompts, max_new_tokens=20,
                                batch_size=2, use_cache=use_cache)
  for r, o in zip(ref.tolist()[::-1], out):
    assert o == r[:len(o)] and all(t == PAD for t in r[len(o):])


def test_sampling_filters_as_hf_warpers():
  from transformers.generation import logits_process as lp
  rng = np.random.RandomState(0)
  logits = rng.randn(4, 100).astype(np.float32) * 3
  s = generation.Sampling(temperature=0.7, top_k=50, top_p=0.95)
  ref = torch.tensor(logits)
  for warper in (lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(50),
                 lp.TopPLogitsWarper(0.95)):
    ref = warper(None, ref)
  ours = np.asarray(generation.filter_logits(jnp.asarray(logits), s))
  kept_ref = np.isfinite(ref.numpy())
  kept = ours > np.finfo(np.float32).min
  np.testing.assert_array_equal(kept, kept_ref)
  np.testing.assert_allclose(ours[kept], ref.numpy()[kept_ref], rtol=1e-6)


def test_sampling_depends_on_seed_and_prompt_not_on_batch(tiny):
  _, _, port = tiny
  prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
  kw = dict(max_new_tokens=12, sampling=generation.PAPER)
  together = generation.generate_ids(port, prompts, seed=7, batch_size=4,
                                     **kw)
  alone = [generation.generate_ids(port, [p], seed=7, first_index=i,
                                   batch_size=1, **kw)[0]
           for i, p in enumerate(prompts)]
  assert together == alone
  other = generation.generate_ids(port, prompts, seed=8, batch_size=4, **kw)
  assert other != together


def test_bf16_loads_in_bf16_and_stays_close(tiny):
  model, path, port = tiny
  half = llama.load(path, dtype=jnp.bfloat16)
  assert half.layers[0].self_attn.q_proj.weight.dtype == jnp.bfloat16
  ids = jnp.asarray(np.arange(3, 15)[None])
  a, b = np.asarray(port(ids)), np.asarray(half(ids))
  assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


@pytest.mark.parametrize("key,value", [
    ("model_type", "gemma"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 8.0}),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),  # incomplete
    ("hidden_act", "gelu"),
    ("partial_rotary_factor", 0.5),
])
def test_config_the_port_does_not_follow_is_refused(tiny, tmp_path, key,
                                                    value):
  _, path, _ = tiny
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  cfg[key] = value
  cfg.pop("rope_parameters", None) if key == "rope_scaling" else None
  with pytest.raises(BadInputError, match=key.split("_")[0]):
    llama.LlamaConfig.from_hf(cfg, source="config.json")


def test_old_config_layout_reads_rope_theta():
  cfg = {"model_type": "llama", "rope_theta": 1e5, "hidden_size": 8,
         "num_attention_heads": 2, "rope_scaling": None, "eos_token_id": [2, 3]}
  c = llama.LlamaConfig.from_hf(cfg)
  assert c.rope_theta == 1e5 and c.eos_token_id == (2, 3)


def test_missing_tensor_is_named(tiny, tmp_path):
  from safetensors.numpy import save_file
  _, path, _ = tiny
  tensors = load_file(os.path.join(path, "model.safetensors"))
  del tensors["model.layers.1.self_attn.k_proj.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  with pytest.raises(BadInputError, match="layers.1.self_attn.k_proj"):
    llama.load(str(tmp_path / "model.safetensors"), config=cfg)


def _word_tokenizer(directory, template=True):
  """A word-level tokenizer.json over the tiny vocabulary, and a chat
  template in tokenizer_config.json."""
  import tokenizers
  from tokenizers import models, pre_tokenizers
  vocab = {"<pad>": PAD, "<s>": 1, "</s>": EOS}
  vocab.update({f"w{i}": i for i in range(3, VOCAB)})
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<pad>", "<s>", "</s>"])
  tok.save(os.path.join(directory, "tokenizer.json"))
  cfg = {"eos_token": "</s>", "bos_token": {"content": "<s>"}}
  if template:
    cfg["chat_template"] = ("{% for m in messages %}{{ bos_token }}w3 "
                            "{{ m['content'] }} w4{% endfor %}"
                            "{% if add_generation_prompt %} w5{% endif %}")
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(cfg, f)


def test_text_generator_tokenises_templates_and_decodes(tiny, tmp_path):
  _, path, port = tiny
  _word_tokenizer(path)
  gen = generation.TextGenerator(port, path, batch_size=2)
  assert gen.render_chat("w9 w10") == "<s>w3 w9 w10 w4 w5"
  assert gen.encode(["w9 w10"], chat=True) == [[1, 3, 9, 10, 4, 5]]
  texts = gen.generate(["w9 w10", "w11"], max_new_tokens=6)
  ids = generation.generate_ids(port, gen.encode(["w9 w10", "w11"]),
                                max_new_tokens=6)
  assert texts == gen.decode(ids)
  assert all("</s>" not in t and "<pad>" not in t for t in texts)
  # Another model of the same architecture reuses the generator.
  gen.use(llama.load(path))
  assert gen.generate(["w9 w10", "w11"], max_new_tokens=6) == texts


def test_one_compile_serves_every_token_and_prompt_of_a_bucket(tiny):
  _, path, port = tiny
  kw = dict(max_new_tokens=9, batch_size=2, buckets=(16,))
  generation.generate_ids(port, [[5, 6, 7]], **kw)
  generation.generate_ids(port, [[8, 9], [10, 11, 12, 13, 14]], **kw)
  # Another model of the same architecture reuses the program too.
  generation.generate_ids(llama.load(path), [[3] * 16], **kw)
  program = generation._program(nnx.graphdef(port), 9, generation.GREEDY,
                                port.config.eos_token_id, PAD, True)
  assert program._cache_size() == 1


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
])
def test_rope_scaling_vs_reference(tmp_path, scaling):
  torch.manual_seed(2)
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
      max_position_embeddings=128, rope_theta=5e4, initializer_range=0.5,
      rope_scaling=scaling)
  model = transformers.LlamaForCausalLM(cfg).eval()
  model.save_pretrained(str(tmp_path))
  port = llama.load(str(tmp_path))
  assert dict(port.config.rope_scaling)["rope_type"] == scaling["rope_type"]
  ids = np.random.RandomState(0).randint(3, VOCAB, (1, 40))
  with torch.no_grad():
    ref = model(torch.tensor(ids)).logits.numpy()
  out = np.asarray(port(jnp.asarray(ids)))
  assert np.abs(out - ref).max() <= LOGITS_TOL
  # The scaling is not a no-op on these positions.
  with open(tmp_path / "config.json") as f:
    unscaled = {**json.load(f), "rope_scaling": None,
                "rope_parameters": {"rope_theta": 5e4, "rope_type": "default"}}
  plain = llama.from_tensors(load_file(str(tmp_path / "model.safetensors")),
                             unscaled)
  assert np.abs(np.asarray(plain(jnp.asarray(ids))) - ref).max() > 1e-3
