"""experiments.merge_peft as a subprocess."""

import os
import subprocess
import sys

import numpy as np
import pytest

from detune_jax.io import (BadInputError, ModelFiles, load_file,
                           merge_adapter, save_file, write_model)
from test_io import _adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(*flags):
  """Command and keyword arguments of a merge_peft subprocess."""
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return ([sys.executable, "-m", "experiments.merge_peft", *flags],
          dict(text=True, cwd=ROOT, env=env))


def _run(*flags):
  cmd, kw = _args(*flags)
  return subprocess.run(cmd, capture_output=True, timeout=120, **kw)


def _base():
  """A base model: a linear, a conv kernel, an embedding and a zero head."""
  rng = np.random.default_rng(0)
  return {"enc.q.weight": rng.standard_normal((4, 6)).astype(np.float32),
          "conv.weight": rng.standard_normal((5, 2, 3, 3)).astype(np.float32),
          "emb.weight": rng.standard_normal((7, 3)).astype(np.float32),
          "head.weight": np.zeros((2, 6), np.float32)}


def test_merge_peft_cli(tmp_path):
  base = _base()
  write_model(tmp_path / "base", base)
  ad, want = _adapter(tmp_path, base)
  res = _run(f"--base={tmp_path / 'base'}", f"--adapter={ad}",
             f"--output_dir={tmp_path / 'ft'}")
  assert res.returncode == 0, res.stderr
  assert "merged 4 tensors" in res.stdout
  got = ModelFiles(tmp_path / "ft")
  for k, v in want.items():
    np.testing.assert_allclose(got.read(k), v, rtol=1e-5, atol=1e-6)
  bad = _run(f"--base={tmp_path / 'base'}", f"--adapter={tmp_path / 'nope'}",
             f"--output_dir={tmp_path / 'ft2'}")
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
  assert "adapter_config.json" in bad.stderr
  assert not os.path.exists(tmp_path / "ft2")
  # A flag that does not parse is bad input too (absl alone exits 1).
  bad = _run(f"--base={tmp_path / 'base'}", "--no_such_flag=1")
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
  assert "no_such_flag" in bad.stderr


def _popen(*flags):
  cmd, kw = _args(*flags)
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          **kw)


def _snapshot(root):
  """``{relative path: bytes}`` of every file under ``root``."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = fh.read()
  return out


def test_merge_peft_never_overwrites(tmp_path):
  base = _base()
  write_model(tmp_path / "base", base, shards=2)
  single = tmp_path / "single"
  single.mkdir()
  save_file(base, single / "base.safetensors")
  ad, _ = _adapter(tmp_path, base)
  other = tmp_path / "other_model"
  write_model(other, {"x": np.ones(3, np.float32)})
  index_only = tmp_path / "index_only"
  index_only.mkdir()
  (index_only / "model.safetensors.index.json").write_text("{}")
  a_file = tmp_path / "a_file"
  a_file.write_text("mine")
  before = _snapshot(tmp_path)
  cases = {  # case: (base, output_dir, text of the one-line error)
      "into_the_base": (tmp_path / "base", tmp_path / "base",
                        "base model's own directory"),
      "into_the_base_file_dir": (single / "base.safetensors", single,
                                 "base model's own directory"),
      "holds_a_model": (tmp_path / "base", other, "model.safetensors"),
      "holds_an_index": (tmp_path / "base", index_only,
                         "model.safetensors.index.json"),
      "is_a_file": (tmp_path / "base", a_file, "not a directory"),
      "into_the_adapter": (tmp_path / "base", ad,
                           "adapter_model.safetensors"),
  }
  procs = {case: _popen(f"--base={b}", f"--adapter={ad}", f"--output_dir={o}")
           for case, (b, o, _) in cases.items()}
  for case, proc in procs.items():
    _, stderr = proc.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2, (case, stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in stderr, (case, stderr)
    assert lines[0].startswith(f"error: {cases[case][1]}: "), (case, lines)
    assert cases[case][2] in lines[0], (case, lines[0])
  assert _snapshot(tmp_path) == before   # nothing written, nothing replaced
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "README.md").write_text("notes")
  ok = _run(f"--base={tmp_path / 'base'}", f"--adapter={ad}",
            f"--output_dir={empty}")
  assert ok.returncode == 0, ok.stderr
  assert sorted(os.listdir(empty)) == [
      "README.md", "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
  assert sorted(ModelFiles(empty).names) == sorted(base)


def test_merge_peft_leaves_nothing_half_written(tmp_path):
  base = _base()
  write_model(tmp_path / "base", base, shards=2)  # head.weight: 2nd shard
  ad, _ = _adapter(tmp_path, base)
  save_file({**load_file(ad / "adapter_model.safetensors"),
             "base_model.model.head.modules_to_save.default.weight":
                 np.zeros((3, 6), np.float32)},   # does not fit head.weight
            ad / "adapter_model.safetensors")
  for out in (tmp_path / "new" / "ft", tmp_path / "existing"):
    if out.name == "existing":
      out.mkdir()
    with pytest.raises(BadInputError, match="head.weight"):
      merge_adapter(tmp_path / "base", ad, out)
    assert not os.path.exists(out) or os.listdir(out) == [], out
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base"] + (
        ["existing"] if out.name == "existing" else []), out
