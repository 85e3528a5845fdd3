"""experiments.convert: HF safetensors <-> orbax, bit for bit."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from detune_jax.io.checkpoints import read_checkpoint
from detune_jax.io.models import write_model
from detune_jax.models import bert


def _convert(src, dst, *extra):
  return subprocess.run([sys.executable, "-m", "experiments.convert",
                         f"--from={src}", f"--to={dst}", *extra],
                        capture_output=True, text=True)


def _same(a, b):
  assert list(a) == list(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
    assert np.asarray(a[name]).tobytes() == np.asarray(b[name]).tobytes(), name


def test_round_trip_is_bit_exact(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
      "a.weight": rng.normal(size=(5, 7)).astype(ml_dtypes.bfloat16),
      "b.weight": rng.normal(size=(3,)).astype(np.float32),
      "c.half": rng.normal(size=(2, 2)).astype(np.float16),
      "d.scalar": np.asarray(3.5, np.float32),
      "e.empty": np.zeros((0, 4), np.float32),
      "f.ids": np.arange(6, dtype=np.int64),
  }
  tensors["b.weight"][0] = np.nan  # every bit survives, NaNs too
  src = tmp_path / "hf"
  write_model(str(src), tensors, shards=2, metadata={"format": "pt", "k": "v"})
  (src / "config.json").write_text('{"model_type": "bert"}')
  (src / "tokenizer.json").write_text("{}")
  r = _convert(src, tmp_path / "orbax")
  assert r.returncode == 0, r.stderr
  assert {"config.json", "tokenizer.json"} <= set(os.listdir(tmp_path / "orbax"))
  assert _convert(tmp_path / "orbax", tmp_path / "back").returncode == 0
  assert _convert(tmp_path / "orbax", tmp_path / "one.safetensors").returncode == 0
  orig = read_checkpoint(str(src))
  for dst in ("orbax", "back", "one.safetensors"):
    got = read_checkpoint(str(tmp_path / dst))
    _same(orig.tensors, got.tensors)
    assert got.metadata == orig.metadata
  assert json.loads((tmp_path / "back" / "config.json").read_text()) == {
      "model_type": "bert"}


def test_existing_destination_and_bad_source(tmp_path):
  write_model(str(tmp_path / "hf"), {"w": np.ones((2, 2), np.float32)})
  (tmp_path / "taken").mkdir()
  r = _convert(tmp_path / "hf", tmp_path / "taken")
  assert r.returncode == 2 and "already exists" in r.stderr
  r = _convert(tmp_path / "missing", tmp_path / "out")
  assert r.returncode == 2 and "missing" in r.stderr
  assert not os.path.exists(tmp_path / "out")
  assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_port_loads_from_orbax(tmp_path):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  cfg = transformers.BertConfig(vocab_size=50, hidden_size=16,
                                num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=20)
  transformers.BertModel(cfg).save_pretrained(str(tmp_path / "hf"))
  assert _convert(tmp_path / "hf", tmp_path / "orbax").returncode == 0
  ids = jnp.arange(8).reshape(2, 4)
  a = bert.load(str(tmp_path / "hf"))(ids)["last_hidden_state"]
  b = bert.load(str(tmp_path / "orbax"))(ids)["last_hidden_state"]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
