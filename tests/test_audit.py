"""The defender's audit end to end on tiny model directories."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from experiments import audit, frontier, stacks


def make_models(tmp_path, n=4, dtype="float32"):
  """A base and n LoRA fine-tunes of two 2-D layers (+ an untouched bias)."""
  rng = np.random.default_rng(0)
  W = {"a.weight": rng.normal(size=(40, 32)) * 0.02,
       "b.weight": rng.normal(size=(32, 40)) * 0.02}
  bias = rng.normal(size=(32,)).astype(np.float32)
  np_dtype = stacks.NP_DTYPES[dtype]
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
def test_frontier_synthetic_scenarios_and_table():
  rows = frontier.run_scenario("gaussian", [2, 3], dim=32, rank=2, layers=1,
                               shared=0.0, steps=30, minilm_dir="/nonexistent",
                               log=lambda *_: None)
  methods = {(r["n"], r["method"]) for r in rows}
  assert (2, "closed_form") not in methods and (3, "closed_form") in methods
  cf3 = [r for r in rows if r["n"] == 3 and r["method"] == "closed_form"][0]
  assert cf3["w_error"] <= -12.0
  md = frontier.markdown(rows, "gaussian")
  assert "| closed_form | — |" in md
  W, Wp = stacks.synthetic_stack(0, 16, 12, 3, 2, shared=0.5,
                                 dtype="bfloat16")
  assert W.dtype == stacks.NP_DTYPES["bfloat16"] and Wp.shape == (3, 16, 12)


def test_frontier_minilm_needs_the_builder():
  with pytest.raises(FileNotFoundError, match="build_minilm_finetunes"):
    frontier.scenario_stack("minilm", 3, dim=8, rank=2, layers=1, shared=0.0,
                            minilm_dir="/nonexistent")
