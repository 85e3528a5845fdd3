"""The benchmark binaries and the PyTorch reference (tiny sizes, no timings)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import detune_jax as dj
from detune_jax.synthetic import lora_stack

torch = pytest.importorskip("torch", reason="torch is the optional "
                            "'reference' extra")
from experiments import torch_reference  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reference_scheduler_matches_rank_schedule():
  rng = np.random.default_rng(0)
  # Long flat stretches (plateaus) between drops, then steady decrease.
  losses = np.concatenate([np.full(30, 1.0), np.linspace(1, 0.5, 20),
                           np.full(40, 0.5), rng.uniform(0.1, 0.2, 60)])
  steps, end = 150, 16
  ref = torch_reference.IncreaseRankOnPlateau(steps, end)
  sched = dj.RankSchedule()
  state = dj.rank_schedule_init(sched, end)
  for t, loss in enumerate(losses, start=1):
    r_ref = ref.step(float(np.float32(loss)))
    state = dj.rank_schedule_step(sched, state, jnp.float32(loss), t, end,
                                  steps)
    assert int(state.rank) == r_ref, t


def test_reference_vs_detune_jax_on_a_small_layer():
  W, W_primes = lora_stack(0, 96, 80, n=4, rank=4)
  torch.manual_seed(0)
  W_ref, losses, ranks, _ = torch_reference.spectral_detuning(
      torch.from_numpy(np.array(W_primes)), 4, 150)
  W_jax, diag = dj.spectral_detuning(W_primes, 4, 150)
  err_ref = float(dj.w_error(W_ref.numpy(), W))
  err_jax = float(dj.w_error(W_jax, W))
  assert err_ref < -12 and err_jax < -12
  assert abs(err_jax - err_ref) < 1.5
  assert ranks[0] == 1 and ranks[-1] == 4
  np.testing.assert_allclose(W_jax, W_ref.numpy(), atol=1e-5)


@pytest.mark.slow
def test_benchmark_binary_smoke(tmp_path):
  out = tmp_path / "bench.json"
  cmd = [sys.executable, "-m", "experiments.bench_solver", "--cases=vit",
         "--layers=1", "--steps=6", "--repeats=1", f"--json_out={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ratio reference/detune_jax" in proc.stdout
  res = json.loads(out.read_text())["vit"]
  for method in ("detune_jax", "reference"):
    assert len(res[method]["walls"]) == 1
    assert len(res[method]["trace"]) == 6
    assert np.isfinite(res[method]["w_error"])
  floor = res["detune_jax"]["floor"]
  assert floor["loop_s"] > 0 and len(floor["ratio_loop"]) == 1
  assert "the one-pass floor of those steps" in proc.stdout


@pytest.mark.slow
def test_closed_form_benchmark_bf16_smoke(tmp_path):
  """bench_closed_form --dtype=bfloat16 times `auto` with the grid step and
  reports the step's memory analysis against the pipeline's budget."""
  out = tmp_path / "bench.json"
  cmd = [sys.executable, "-m", "experiments.bench_closed_form", "--dim=64",
         "--ns=3", "--methods=auto", "--dtype=bfloat16", "--repeats=1",
         f"--json_out={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "grid step memory (XLA)" in proc.stdout
  row, = json.loads(out.read_text())
  assert row["method"] == "auto" and 0.5 < row["bit_exact"] <= 1.0
  mem = row["grid_memory"]
  assert mem["temporaries"] > 0
  assert mem["budgeted"] >= mem["arguments"] + mem["temporaries"]
