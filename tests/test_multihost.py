"""Two processes over loopback (jax.distributed, gloo) == one process."""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import pytest

from conftest import make_tiny
from detune_jax import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 100


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  models, base = make_tiny(tmp_path / "m", shards=2)
  out = tmp_path / "out"
  port = _free_port()
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.recover",
       f"--models={','.join(models)}", f"--output_dir={out}",
       f"--ground_truth={base}", f"--steps={STEPS}",
       f"--coordinator_address=localhost:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=ROOT, env=env, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  logs = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    logs.append(stderr)
  report = json.loads((out / "report.json").read_text())
  assert report["processes"] == 2 and report["groups"] == 2
  assert report["w_error"] < -10
  # Each process solved only its own groups, and together all of them.
  solved = [set(re.findall(r"group (\d+)/2:", log)) for log in logs]
  assert solved[0] and solved[1] and not solved[0] & solved[1]
  assert solved[0] | solved[1] == {"1", "2"}
  assert os.listdir(out / "parts") == []
  # Byte-identical to a one-process run (same devices per process), shard by
  # shard.
  ref = tmp_path / "ref"
  if len(jax.devices()) == 1:
    pipeline.recover(pipeline.RecoverConfig(models=tuple(models),
                                            output_dir=str(ref), steps=STEPS),
                     progress_bar=False)
  else:   # this pytest process has more devices: run the reference alone.
    subprocess.run([sys.executable, "-m", "experiments.recover",
                    f"--models={','.join(models)}", f"--output_dir={ref}",
                    f"--steps={STEPS}"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
  files = report["output_files"]
  assert files == ["model-00001-of-00002.safetensors",
                   "model-00002-of-00002.safetensors",
                   "model.safetensors.index.json"]
  for f in files:
    assert (out / f).read_bytes() == (ref / f).read_bytes(), f
