"""experiments.recover as a subprocess: bad input, kill + resume, plots."""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import make_tiny
from detune_jax import pipeline
from detune_jax.io import ModelFiles, write_model
from test_io import write_lowra_parquet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The head of an absl log line, e.g. "I1207 14:10:15.283484 1404825 run.py:12]".
ABSL_PREFIX = re.compile(r"[IWEF]\d{4} [\d:.]+ +\d+ \w+\.py:\d+\]")
STEPS = 100


def _env(cache_dir=None, kill_after_groups=None):
  env = dict(os.environ)
  if kill_after_groups:
    env["DETUNE_JAX_KILL_AFTER_GROUPS"] = str(kill_after_groups)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  if cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  return env


def _cmd(*flags):
  return [sys.executable, "-m", "experiments.recover", *flags]


def _run(*flags, cache_dir=None, timeout=300, kill_after_groups=None):
  return subprocess.run(_cmd(*flags), capture_output=True, text=True,
                        cwd=ROOT, env=_env(cache_dir, kill_after_groups),
                        timeout=timeout)


class _Evil:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
  """``{case: (flags, output dir)}`` of inputs that must exit 2."""
  root = tmp_path_factory.mktemp("bad")
  models, _ = make_tiny(root / "m")
  m0, m1 = models[0], models[1]

  def variant(name, edit):
    d = root / name
    shutil.copytree(m1, d)
    edit(d)
    return str(d)

  def tensors(path):
    mf = ModelFiles(path)
    return {k: np.array(mf.read(k)) for k in mf.names}

  def truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])

  def corrupt(d):
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:20] = b"#" * 12
    f.write_bytes(bytes(raw))

  def rename(d):
    t = tensors(d)
    t["extra.weight"] = t.pop("emb.weight")
    write_model(d, t)

  def reshape(d):
    t = tensors(d)
    t["emb.weight"] = t["emb.weight"].reshape(24, 10)
    write_model(d, t)

  def nan(d):
    t = tensors(d)
    t["enc.1.q.weight"][3, 4] = np.nan
    write_model(d, t)

  marker = str(root / "unpickled")
  (root / "model.bin").write_bytes(pickle.dumps(_Evil(marker)))
  (root / "hf_pickle").mkdir()
  (root / "hf_pickle" / "pytorch_model.bin").write_bytes(
      pickle.dumps(_Evil(marker)))
  (root / "lowra" / "vit").mkdir(parents=True)
  write_lowra_parquet(root / "lowra/vit/train-00000.parquet",
                      {"q.weight": (8, 6, 2)}, n_loras=5)
  (root / "peft").mkdir()
  shutil.copy(os.path.join(m1, "model.safetensors"),
              root / "peft" / "adapter_model.safetensors")
  (root / "peft" / "adapter_config.json").write_text('{"r": 2}')
  os.symlink(root / "loop", root / "loop")
  other = root / "other_run"
  other.mkdir()
  (other / "run.json").write_text(json.dumps({"fingerprint": "0" * 64}))
  cases = {
      "one_model": [m0],
      "missing_file": [m0, str(root / "nope.safetensors")],
      "truncated": [m0, variant("trunc", truncate)],
      "corrupt": [m0, variant("corrupt", corrupt)],
      "names_differ": [m0, variant("renamed", rename)],
      "shapes_differ": [m0, variant("reshaped", reshape)],
      "non_finite": [m0, variant("nan", nan)],
      "pickle_file": [m0, str(root / "model.bin")],
      "pickle_dir": [m0, str(root / "hf_pickle")],
      "rank_too_large": [m0, m1],
      "different_run": [m0, m1],
      "lowra_too_few_loras": [],
      "empty_models": [],              # --models= is not the demo
      "comma_models": ["", ""],        # --models=,
      "trailing_comma": [m0, m1, ""],  # an empty entry at the end
      "empty_entry": [m0, "", m1],     # --models=a,,b
      "same_path_twice": [m0, m1, m0],
      "file_and_its_dir": [m0, m1, os.path.join(m0, "model.safetensors")],
      "equal_copy": [m0, m1, variant("copy", lambda d: None)],
      "symlink_loop": [m0, m1, str(root / "loop")],
      "output_under_a_file": [m0, m1],
      "peft_adapter": [m0, m1, str(root / "peft")],
  }
  out = {}
  for case, paths in cases.items():
    out_dir = other if case == "different_run" else root / f"out_{case}"
    if case == "output_under_a_file":
      out_dir = root / "model.bin" / "out"
    flags = [f"--models={','.join(paths)}", f"--output_dir={out_dir}",
             f"--steps={STEPS}"]
    if case == "rank_too_large":
      flags.append("--rank=17")
    if case == "lowra_too_few_loras":
      flags[0] = f"--lowra_bench={root / 'lowra'}"
      flags += ["--subset=vit", "--n_loras=6"]
    out[case] = (flags, out_dir)
  return out, marker


# The one-line message must name the file (and tensor, where one is at fault).
EXPECT = {
    "one_model": "at least 2", "missing_file": "nope.safetensors",
    "truncated": "trunc/model.safetensors", "corrupt": "corrupt",
    "names_differ": "emb.weight", "shapes_differ": "'emb.weight'",
    "non_finite": "'enc.1.q.weight'", "pickle_file": "model.bin",
    "pickle_dir": "pytorch_model.bin", "rank_too_large": "'enc.0.conv.weight'",
    "different_run": "different run",
    "lowra_too_few_loras": "'lora_5_rank' missing",
    "empty_models": "--models: is empty", "comma_models": "--models: is empty",
    "trailing_comma": "--models: has an empty entry",
    "empty_entry": "--models: has an empty entry",
    "same_path_twice": "is the same model as",
    "file_and_its_dir": "model.safetensors: is the same model as",
    "equal_copy": "copy: every tensor equals those of",
    "symlink_loop": "loop: symbolic link loop",
    "output_under_a_file": "model.bin is not a directory",
    "peft_adapter": "peft: is a PEFT adapter, not a merged model",
}


def test_bad_input_exits_2_with_one_line(bad_inputs):
  cases, marker = bad_inputs
  procs = {case: subprocess.Popen(_cmd(*flags), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                  env=_env())
           for case, (flags, _) in cases.items()}
  for case, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2, (case, stderr)
    assert len(lines) == 1, (case, stderr)
    assert "Traceback" not in stderr, case
    assert EXPECT[case] in lines[0], (case, lines[0])
    out_dir = cases[case][1]
    assert not os.path.exists(os.path.join(out_dir, "model.safetensors")), case
    if case == "different_run":
      assert sorted(os.listdir(out_dir)) == ["run.json"]
    else:
      assert not os.path.exists(out_dir), case
  assert not os.path.exists(marker)   # the pickles were never loaded


def test_kill_then_resume_matches_uninterrupted_run(tiny_models, tmp_path):
  models, base = tiny_models
  cache = tmp_path / "jax_cache"
  out = tmp_path / "out"
  flags = [f"--models={','.join(models)}", f"--output_dir={out}",
           f"--steps={STEPS}", f"--ground_truth={base}"]
  killed = _run(*flags, cache_dir=cache, kill_after_groups=1)
  assert killed.returncode == -9, killed.stderr[-2000:]
  # A first run compiles its programs for seconds: the bar says so.
  assert "compiling" in killed.stderr
  assert not os.path.exists(out / "model.safetensors")
  assert sorted(os.listdir(out / "checkpoint")) == ["0"]
  done = _run(*flags, "--plots", cache_dir=cache)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "W-Error: auto" in done.stdout
  # Log lines go above the progress bar, never into its line.
  for line in done.stderr.replace("\r", "\n").splitlines():
    assert not ("layer/s" in line and ABSL_PREFIX.search(line)), line
  report = json.loads((out / "report.json").read_text())
  assert report["resumed_groups"] == 1 and report["w_error"] < -10
  for png in ("loss_curves.png", "w_error_hist.png",
              "w_error_cumulative.png"):
    assert (out / png).stat().st_size > 1000, png
  # Same bytes as one uninterrupted run (in-process when it has the same
  # single device as the subprocesses).
  ref = tmp_path / "ref"
  if len(jax.devices()) == 1 and "XLA_FLAGS" not in os.environ:
    pipeline.recover(pipeline.RecoverConfig(models=tuple(models),
                                            output_dir=str(ref), steps=STEPS),
                     progress_bar=False)
  else:
    assert _run(f"--models={','.join(models)}", f"--output_dir={ref}",
                f"--steps={STEPS}", cache_dir=cache).returncode == 0
  assert (out / "model.safetensors").read_bytes() == \
      (ref / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_embedded_demo_runs(tmp_path):
  res = _run(f"--output_dir={tmp_path / 'demo'}", timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  line = [l for l in res.stdout.splitlines() if l.startswith("W-Error")][0]
  ours, mean = float(line.split()[2]), float(line.split()[4])
  assert ours < -12 and mean > -6


def test_help_lists_user_flags_only():
  res = _run("--help")
  text = res.stdout + res.stderr
  assert "--models" in text and "--compilation_cache" in text
  assert "Testing" not in text and "kill" not in text


@pytest.mark.slow
def test_explain_steps_flag(tmp_path):
  import ml_dtypes
  models, _ = make_tiny(tmp_path / "m", dtype=ml_dtypes.bfloat16)
  out = tmp_path / "out"
  res = _run(f"--models={','.join(models)}", f"--output_dir={out}",
             f"--steps={STEPS}", "--explain_steps=2000")
  assert res.returncode == 0, res.stderr[-2000:]
  report = json.loads((out / pipeline.REPORT_FILE).read_text())
  ex = report["explain"]
  assert ex["steps"] == 2000 and ex["layers"] == report["n_solved"]
  assert (f"explained by the releases: {ex['explained_layers']} of "
          f"{ex['layers']} bf16/fp16 layers") in res.stdout
  # The Mean-LoRA average is explained on no layer: the run names them.
  mean = _run(f"--models={','.join(models)}", f"--output_dir={tmp_path / 'm'}",
              "--solver=mean_lora", "--explain_steps=250")
  assert mean.returncode == 0, mean.stderr[-2000:]
  names = [l["name"] for l in json.loads(
      (tmp_path / "m" / pipeline.REPORT_FILE).read_text())["layers"]]
  line = [l for l in mean.stdout.splitlines()
          if l.startswith("not explained")][0]
  assert all(nm in line for nm in names[:5])
  assert report["solver_options"] == {}
  # The grid step's ablation settings are library settings
  # (detune_jax.GridSettings), not flags.
  for bad_flag in ("--explain_steps=-1", "--grid_steps=7"):
    bad = _run(f"--models={','.join(models)}",
               f"--output_dir={tmp_path / 'x'}", bad_flag)
    # A bad flag is bad input: exit 2 and one line naming it.
    assert bad.returncode == 2, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert bad_flag.split("=")[0][2:] in bad.stderr
    assert not os.path.exists(tmp_path / "x")
