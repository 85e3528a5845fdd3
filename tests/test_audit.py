"""The defender's audit end to end on tiny model directories."""

import json
import os
import pickle
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from detune_jax import audit
from detune_jax import model_stacks
from detune_jax.io import BadInputError, ModelFiles, write_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_models(tmp_path, n=4, dtype="float32"):
  """A base and n LoRA fine-tunes of two 2-D layers (+ an untouched bias)."""
  rng = np.random.default_rng(0)
  W = {"a.weight": rng.normal(size=(40, 32)) * 0.02,
       "b.weight": rng.normal(size=(32, 40)) * 0.02}
  bias = rng.normal(size=(32,)).astype(np.float32)
  np_dtype = jnp.dtype(dtype)
  base = tmp_path / "base"
  base.mkdir()
  save_file({**{k: v.astype(np_dtype) for k, v in W.items()}, "bias": bias},
            str(base / "model.safetensors"))
  paths = []
  for i in range(n):
    out = tmp_path / f"ft{i}"
    out.mkdir()
    t = {"bias": bias}
    for k, v in W.items():
      B = rng.normal(size=(v.shape[0], 3)) * 0.02
      A = rng.normal(size=(3, v.shape[1])) * 0.02
      base_v = v.astype(np_dtype).astype(np.float32)
      t[k] = (base_v + B @ A).astype(np_dtype)
    save_file(t, str(out / "model.safetensors"))
    paths.append(str(out))
  return str(base), paths


def test_audit_quick(tmp_path):
  base, models = make_models(tmp_path, n=3)
  res = audit.audit(base, models, rank=3, threshold=-12.0,
                    solvers=("mean_lora", "closed_form"), log=lambda *_: None)
  by_n = {r["n"]: r for r in res["per_n"]}
  assert sorted(by_n) == [2, 3]
  assert by_n[3]["overall"] <= -12.0 and by_n[2]["overall"] > -12.0
  assert res["leak_n"] == 3
  assert set(by_n[3]["best_solver"].values()) == {"closed_form"}


@pytest.mark.slow
def test_audit_library(tmp_path):
  base, models = make_models(tmp_path)
  res = audit.audit(base, models, rank=3, steps=40, threshold=-12.0,
                    log=lambda *_: None)
  assert sorted(res["layers"]) == ["a.weight", "b.weight"]
  assert [r["n"] for r in res["per_n"]] == [2, 3, 4]
  by_n = {r["n"]: r for r in res["per_n"]}
  assert "closed_form" not in by_n[2]["per_solver"]  # not identifiable
  assert by_n[3]["overall"] <= -12.0                  # exact data, n = 3
  assert by_n[2]["overall"] > -12.0
  assert res["leak_n"] == 3
  assert res["layer_leak_n"] == {"a.weight": 3, "b.weight": 3}
  md = audit.table(res)
  assert md.count("\n") == 4 and "| 3 |" in md


@pytest.mark.slow
def test_audit_binary(tmp_path):
  base, models = make_models(tmp_path, n=3, dtype="bfloat16")
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.audit", f"--base={base}",
       "--models=" + ",".join(models), f"--out={out}", "--rank=3",
       "--steps=20", "--solvers=mean_lora,closed_form"],
      capture_output=True, text=True, timeout=600,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "leak" in proc.stdout
  res = json.loads((out / "audit.json").read_text())
  assert [r["n"] for r in res["per_n"]] == [2, 3]
  assert (out / "audit.png").stat().st_size > 1000


@pytest.mark.slow
def test_frontier_binary_synthetic_scenario_and_table(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.frontier", "--scenarios=gaussian",
       "--ns=2,3", "--dim=32", "--rank=2", "--layers=1", "--steps=30",
       f"--out={tmp_path}"], capture_output=True, text=True, timeout=600,
      cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = json.loads((tmp_path / "frontier.json").read_text())
  methods = {(r["n"], r["method"]) for r in rows}
  assert (2, "closed_form") not in methods and (3, "closed_form") in methods
  cf3 = [r for r in rows if r["n"] == 3 and r["method"] == "closed_form"][0]
  assert cf3["w_error"] <= -12.0
  md = (tmp_path / "frontier.md").read_text()
  assert "### gaussian" in md and "| closed_form | — |" in md
  assert (tmp_path / "frontier_gaussian.png").stat().st_size > 1000


def test_real_scenarios_need_their_fine_tunes():
  with pytest.raises(FileNotFoundError, match="need 3"):
    model_stacks.folder_stack("/nonexistent", 3)


def test_the_default_folder_is_merged_from_the_shipped_bench(tmp_path,
                                                             monkeypatch):
  root = tmp_path / "merged"
  monkeypatch.setattr(model_stacks, "MINILM_DIR", str(root))
  base, models = model_stacks.folder_models(str(root), 2)
  assert [os.path.basename(m) for m in models] == ["ft00_lora_00",
                                                   "ft01_lora_01"]
  assert os.path.exists(os.path.join(base, "config.json"))
  W, Wp = model_stacks.folder_stack(str(root), 2)
  assert W.shape == (24, 384, 384) and Wp.shape == (24, 2, 384, 384)
  assert 0 < float(np.abs(Wp[:, 0] - W).max()) < 1


def test_frontier_scenarios_are_checked():
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.frontier", "--scenarios=gausian",
       "--out=/nonexistent/frontier"], capture_output=True, text=True,
      timeout=300, cwd=ROOT)
  assert proc.returncode != 0 and "unknown --scenarios" in proc.stderr


# ---------------------------------------------------- odd shapes, bad input

class _Evil:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


def _lora(rng, W, r=3):
  """``W + B A`` with ``B A`` of rank ``r`` on ``W``'s matrix view
  ``[out, prod(rest)]`` (how recover solves conv and 3-D tensors)."""
  d = W.shape[0]
  k = W.size // d
  B = rng.normal(size=(d, r)) * 0.02
  A = rng.normal(size=(r, k)) * 0.02
  return (W.reshape(d, k) + B @ A).reshape(W.shape).astype(np.float32)


def make_odd_models(root, n=3, shards=1):
  """A base and ``n`` fine-tunes with a 2-D, a conv ``[o, i, kh, kw]`` and a
  3-D LoRA'd tensor, plus an untouched bias; ``shards`` > 1 writes sharded
  HF directories with an index."""
  rng = np.random.default_rng(0)
  W = {"a.weight": rng.normal(size=(40, 32)) * 0.02,
       "conv.weight": rng.normal(size=(16, 4, 3, 3)) * 0.02,
       "t.weight": rng.normal(size=(12, 5, 4)) * 0.02}
  W = {k: v.astype(np.float32) for k, v in W.items()}
  bias = rng.normal(size=(32,)).astype(np.float32)
  write_model(os.path.join(root, "base"), {**W, "bias": bias}, shards=shards)
  paths = []
  for i in range(n):
    t = {k: _lora(rng, v) for k, v in W.items()}
    t["bias"] = bias
    paths.append(os.path.join(root, f"ft{i}"))
    write_model(paths[-1], t, shards=shards)
  return os.path.join(root, "base"), paths


def _quiet_audit(base, models, **kw):
  kw = dict(dict(rank=3, threshold=-12.0, solvers=("mean_lora", "closed_form"),
                 log=lambda *_: None), **kw)
  return audit.audit(base, models, **kw)


def test_audit_conv_and_3d_layers_are_audited_as_matrices(tmp_path):
  base, models = make_odd_models(str(tmp_path))
  res = _quiet_audit(base, models)
  assert sorted(res["layers"]) == ["a.weight", "conv.weight", "t.weight"]
  by_n = {r["n"]: r for r in res["per_n"]}
  for nm in res["layers"]:  # solved as [16, 36] and [12, 20]: exact at n = 3
    assert by_n[3]["per_layer"][nm] <= -12.0, nm
  assert res["leak_n"] == 3


def test_audit_reads_sharded_models(tmp_path):
  base, models = make_odd_models(str(tmp_path), shards=2)
  assert os.path.exists(os.path.join(models[0],
                                     "model.safetensors.index.json"))
  res = _quiet_audit(base, models)
  assert sorted(res["layers"]) == ["a.weight", "conv.weight", "t.weight"]
  assert res["leak_n"] == 3


@pytest.fixture(scope="module")
def audit_bad_inputs(tmp_path_factory):
  """``{case: (base, models, expected text)}``: inputs the audit refuses."""
  root = tmp_path_factory.mktemp("audit_bad")
  base, (m0, m1, m2) = make_odd_models(str(root / "m"))

  def variant(name, edit, src=m2):
    d = root / name
    mf = ModelFiles(src)
    t = {k: np.array(mf.read(k)) for k in mf.names}
    edit(t)
    write_model(d, t)
    return str(d)

  def set_nan(t):
    t["a.weight"][3, 4] = np.nan

  def set_inf(t):
    t["conv.weight"][0, 0, 1, 1] = np.inf

  def drop(t):
    del t["conv.weight"]

  def reshape(t):
    t["a.weight"] = t["a.weight"].reshape(32, 40)

  def to_bf16(t):
    t["a.weight"] = t["a.weight"].astype(ml_dtypes.bfloat16)

  def truncate(d):
    f = os.path.join(d, "model.safetensors")
    with open(f, "rb") as fh:
      raw = fh.read()
    with open(f, "wb") as fh:
      fh.write(raw[:-100])
    return d

  marker = str(root / "unpickled")
  with open(root / "model.bin", "wb") as f:
    f.write(pickle.dumps(_Evil(marker)))
  (root / "hf_pickle").mkdir()
  with open(root / "hf_pickle" / "pytorch_model.bin", "wb") as f:
    f.write(pickle.dumps(_Evil(marker)))
  (root / "empty").mkdir()
  (root / "empty" / "model.safetensors").write_bytes(b"")
  trunc = truncate(variant("trunc", lambda t: None))
  cases = {
      "one_model": (base, [m0], "at least 2"),
      "nonexistent": (base, [m0, str(root / "nope")], "nope: no such file"),
      "pickle_file": (base, [m0, str(root / "model.bin")], "model.bin"),
      "pickle_dir": (base, [m0, str(root / "hf_pickle")],
                     "pytorch_model.bin"),
      "missing_tensor": (base, [m0, m1, variant("drop", drop)],
                         "drop: tensor 'conv.weight': tensor missing"),
      "shape_mismatch": (base, [m0, m1, variant("reshape", reshape)],
                         "reshape/model.safetensors: tensor 'a.weight': "
                         "shape"),
      "dtype_mismatch": (base, [m0, m1, variant("bf16", to_bf16)],
                         "bf16/model.safetensors: tensor 'a.weight': dtype"),
      "nan": (base, [m0, m1, variant("nan", set_nan)],
              "nan/model.safetensors: tensor 'a.weight': non-finite"),
      "inf": (base, [m0, m1, variant("inf", set_inf)],
              "inf/model.safetensors: tensor 'conv.weight': non-finite"),
      "nan_base": (variant("nan_base", set_nan, src=base), [m0, m1, m2],
                   "nan_base/model.safetensors: tensor 'a.weight': "
                   "non-finite"),
      "base_shape": (variant("base_shape", reshape, src=base), [m0, m1, m2],
                     "base_shape/model.safetensors: tensor 'a.weight'"),
      "base_missing": (variant("base_drop", drop, src=base), [m0, m1, m2],
                       "tensor 'conv.weight'"),
      "truncated": (base, [m0, m1, trunc], "trunc/model.safetensors"),
      "empty": (base, [m0, m1, str(root / "empty")],
                "empty/model.safetensors"),
      "identical": (base, [m0, m0], "is the same model as"),
      "rank_too_large": (base, [m0, m1, m2], "'t.weight': --rank 13 is too "
                         "large"),
  }
  return cases, marker


def test_audit_bad_input_names_file_and_tensor(audit_bad_inputs):
  cases, marker = audit_bad_inputs
  for case, (base, models, want) in cases.items():
    rank = 13 if case == "rank_too_large" else 3
    with pytest.raises(BadInputError) as e:
      _quiet_audit(base, models, rank=rank)
    assert want in str(e.value), (case, str(e.value))
    assert "\n" not in str(e.value), case
  assert not os.path.exists(marker)   # the pickles were never loaded


def _run_audit(*flags):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.Popen([sys.executable, "-m", "experiments.audit", *flags],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=ROOT, env=env)


def test_audit_binary_bad_input_exits_2_with_one_line(audit_bad_inputs,
                                                      tmp_path):
  cases, marker = audit_bad_inputs
  a_file = tmp_path / "a_file"
  a_file.write_text("mine")
  runs = {c: cases[c][:2] for c in ("nan", "pickle_dir", "dtype_mismatch",
                                    "one_model")}
  runs["out_is_a_file"] = cases["identical"][0], cases["nan_base"][1]
  want = {c: cases[c][2] for c in runs if c in cases}
  want["out_is_a_file"] = "a_file: "
  procs = {}
  for case, (base, models) in runs.items():
    out = a_file if case == "out_is_a_file" else tmp_path / f"out_{case}"
    procs[case] = _run_audit(f"--base={base}", f"--models={','.join(models)}",
                             f"--out={out}", "--rank=3", "--steps=5",
                             "--solvers=mean_lora")
  # A flag that does not parse is bad input too (absl alone exits 1).
  base, models = cases["nan"][:2]
  procs["bad_flag"] = _run_audit(f"--base={base}",
                                 f"--models={','.join(models)}",
                                 f"--out={tmp_path / 'out_bad_flag'}",
                                 "--steps=many")
  want["bad_flag"] = "steps"
  for case, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2, (case, stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in stderr, (case, stderr)
    assert lines[0].startswith("error: ") and want[case] in lines[0], (
        case, lines[0])
    assert not os.path.exists(tmp_path / f"out_{case}"), case
  assert a_file.read_text() == "mine"
  assert not os.path.exists(marker)


def test_audit_json_is_strict(tmp_path):
  base, models = make_odd_models(str(tmp_path))
  res = _quiet_audit(base, models)
  res["per_n"][0]["per_layer"]["a.weight"] = float("nan")
  res["per_n"][0]["overall"] = float("-inf")
  path = audit.write_json(res, str(tmp_path / "out"))

  def refuse(token):
    raise ValueError(f"not strict JSON: {token}")

  with open(path) as f:
    got = json.load(f, parse_constant=refuse)
  assert got["per_n"][0]["per_layer"]["a.weight"] is None
  assert got["per_n"][0]["overall"] is None
  assert got["layers"] == res["layers"]


def test_audit_release_dtype_rounds_and_counts_bit_exact(tmp_path):
  """--release_dtype=bfloat16 --from_rounded_base audits float32 files as
  fine-tunes of the base released in bf16: the same W-Errors as the bf16
  files made so, and the share of the base's weights recovered bit for
  bit, per solver and for the best. Without --from_rounded_base each file
  is rounded on its own: no base on the grid fits, auto keeps its
  estimate before the grid step, and fewer weights come back."""
  base, models = make_models(tmp_path, n=3)
  kw = dict(rank=3, threshold=-8.0, solvers=("mean_lora", "auto"),
            log=lambda *_: None)
  stored = audit.audit(base, models, **kw)
  assert not stored["low_precision"]
  assert all("bit_exact" not in r for r in stored["per_n"])
  plain = audit.audit(base, models, release_dtype="bfloat16", **kw)
  assert plain["low_precision"] and not plain["from_rounded_base"]
  res = audit.audit(base, models, release_dtype="bfloat16",
                    from_rounded_base=True, **kw)
  assert res["low_precision"] and res["release_dtype"] == "bfloat16"
  plain3 = {r["n"]: r for r in plain["per_n"]}[3]
  assert plain3["bit_exact_per_solver"]["auto"] < 0.85
  by_n = {r["n"]: r for r in res["per_n"]}
  exact = by_n[3]["bit_exact_per_solver"]
  # The grid step of auto: most weights bit for bit from 3 bf16 releases;
  # Mean-LoRA rounded to the grid gets few.
  assert exact["auto"] >= 0.9 and exact["mean_lora"] <= 0.2
  assert set(by_n[3]["best_solver"].values()) == {"auto"}
  assert by_n[3]["bit_exact"] == exact["auto"]
  assert res["leak_n"] == 3
  # Rounded as a bf16 release: the same as auditing the bf16 files.
  bf16_dir = tmp_path / "bf16"
  bf16_dir.mkdir()
  base16, models16 = make_models(bf16_dir, n=3, dtype="bfloat16")
  files = audit.audit(base16, models16, **kw)
  assert files["low_precision"]
  for a, b in zip(res["per_n"], files["per_n"]):
    assert abs(a["overall"] - b["overall"]) < 0.05
    assert abs(a["bit_exact"] - b["bit_exact"]) < 0.01
  md = audit.table(res)
  assert f"({100 * exact['auto']:.1f}%)" in md


def test_audit_binary_bad_release_dtype_exits_2(tmp_path):
  base, models = make_models(tmp_path, n=2)
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.audit", f"--base={base}",
       "--models=" + ",".join(models), "--release_dtype=int8"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "release_dtype" in lines[0], proc.stderr
