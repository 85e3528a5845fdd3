"""The bit-exact studies (research.bit_exact, research.lowrank_probe,
research.off_grid) end to end on tiny synthetic bf16 stacks, and the tests
of explained bases they share (research.identifiability)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import detune_jax as dj
from detune_jax.solvers import grid
from detune_jax.synthetic import lora_stack
from research import identifiability


@pytest.mark.slow
def test_bit_exact_binary_with_explain(tmp_path):
  out = tmp_path / "rows.json"
  proc = subprocess.run(
      [sys.executable, "-m", "research.bit_exact", "--ns=3", "--dim=64",
       "--rank=8", "--layers=1", "--grid_steps=30", "--explain",
       "--explain_swaps", f"--json_out={out}"],
      capture_output=True, text=True, timeout=600,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = {r["method"]: r for r in json.loads(out.read_text())}
  assert {"closed_form", "auto", "oracle", "data_limit", "explain_auto",
          "explain_oracle", "explain_truth",
          "identifiable_bound"} <= set(rows)
  # The true base is explained by the true updates; the search finds some.
  assert rows["explain_truth"]["explained_layers"] == 1
  assert rows["explain_truth"]["reproduced"] == 1.0
  # On this stack (r = d/8) the grid step's output is explained too, so the
  # weights it gets wrong are not determined by the releases: the bound is
  # at most its share, and below what the true updates would determine.
  assert rows["explain_auto"]["explained_layers"] == 1
  bound = rows["identifiable_bound"]["bit_exact"]
  assert bound <= rows["auto"]["bit_exact"] < 1.0
  assert bound < rows["data_limit"]["determined"]
  assert "identifiable_bound" in proc.stdout
  # --explain_swaps: the true base with the entries that the true updates
  # leave open moved is explained too, and counted; auto is explained, so
  # no entry of it is swapped.
  moved = rows["explain_moved"]
  assert moved["explained_layers"] == 1 and moved["differ"] > 0
  assert bound <= 1.0 - moved["differ"]
  assert rows["swaps_auto"]["tested"] == 0
  assert rows["swaps_oracle"]["differ"] == 0.0


@pytest.mark.slow
def test_lowrank_probe_binary(tmp_path):
  """At low rank (r = d/32) the grid step loses weights even from the true
  base, where a converged continuous fit keeps them; auto's errors sit at
  small weights (docs/results.md, "Why low ranks are harder")."""
  out = tmp_path / "probe.json"
  proc = subprocess.run(
      [sys.executable, "-m", "research.lowrank_probe", "--dim=64",
       "--rank=2", "--layers=1", "--fit_steps=1000", f"--json_out={out}"],
      capture_output=True, text=True, timeout=600,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = {r["start"]: r for r in json.loads(out.read_text())}
  assert set(rows) == {"auto", "truth", "perturbed", "auto_error"}
  truth, perturbed = rows["truth"], rows["perturbed"]
  assert truth["start_bit_exact"] == 1.0
  assert truth["grid_refine"] < truth["continuous_fit"] - 0.01
  assert truth["continuous_fit"] >= truth["data_limit"] - 0.005
  assert perturbed["start_bit_exact"] < 0.99
  assert perturbed["continuous_fit"] > perturbed["grid_refine"] + 0.005
  err = rows["auto_error"]
  assert 0 < err["wrong"]
  assert err["median_abs_w_wrong"] < 0.1 * err["median_abs_w"]
  assert err["coarse_wrong"] > 5 * err["coarse"]
  assert 0.9 < err["weighted_fit"] < truth["continuous_fit"]


def _rank2_stack():
  """``(W, M, W_primes, truth)``: a 64x48 bf16 base, n=3 rank-2 updates."""
  key = jax.random.key(3)
  W = (jax.random.normal(key, (64, 48)) * 0.02).astype(jnp.bfloat16)
  B = jax.random.normal(jax.random.fold_in(key, 1), (3, 64, 2)) * 0.02
  A = jax.random.normal(jax.random.fold_in(key, 2), (3, 2, 48)) * 0.02
  M = B @ A
  Wp = (W.astype(jnp.float32)[None] + M).astype(jnp.bfloat16)
  truth = np.asarray(W, np.float32)
  return W, M, Wp, truth


def test_swap_tests_open_the_open_entries_only():
  """``bit_exact --explain_swaps``: an entry counts as open only where the
  true base with the candidate's value there is explained."""
  W, M, Wp, truth = _rank2_stack()
  # Open given the true updates: another grid point in the intersection.
  moved = identifiability.moved_base(Wp, M, W)
  is_open = moved != truth
  assert 5 <= is_open.sum() <= 0.05 * truth.size
  # Far off: the largest weights moved 8 grid steps, which no rank-2 update
  # next to the others can follow.
  big = np.argsort(-np.abs(truth).ravel())[:6]
  far = np.asarray(W).ravel().copy()
  for _ in range(8):
    far[big] = np.asarray(grid._next_toward(jnp.asarray(far[big]), up=True))
  candidate = moved.ravel().copy()
  candidate[big] = far[big].astype(np.float32)
  candidate = candidate.reshape(truth.shape)
  witness = dj.explain_releases(Wp, truth, 2)
  assert bool(witness.explained)
  opened, tested, tests = identifiability.swap_tests(
      Wp, truth, candidate, 2, witness.updates, group=4, steps=4000, seed=0)
  assert (tested == (candidate != truth)).all()
  assert not opened.ravel()[big].any()
  assert not (opened & (candidate == truth)).any()
  assert opened[is_open].mean() >= 0.9
  # Groups with a far entry were split down to it.
  assert tests > (is_open.sum() + 6) / 4 + 6
  # Started from the witness, the same answer as from scratch for a few.
  for e in np.flatnonzero(opened)[:2]:
    base = truth.ravel().copy()
    base[e] = candidate.ravel()[e]
    assert bool(dj.explain_releases(Wp, base.reshape(truth.shape), 2,
                                    max_steps=16000).explained)
  # A sample: at most that many tested, singly.
  opened, tested, tests = identifiability.swap_tests(
      Wp, truth, candidate, 2, witness.updates, group=1, steps=4000, seed=0,
      sample=5)
  assert tested.sum() == tests == 5 and not (opened & ~tested).any()


def test_first_order_closes_the_far_entries_only():
  """``bit_exact --swap_first_order``: the smallest LP margin of each swap
  is < 0 where an entry is moved 8 grid steps at the largest weights, and
  >= 0 where the true updates leave the entry open."""
  W, M, Wp, truth = _rank2_stack()
  moved = identifiability.moved_base(Wp, M, W)
  big = np.argsort(-np.abs(truth).ravel())[:2]
  far = np.asarray(W).ravel().copy()
  for _ in range(8):
    far[big] = np.asarray(grid._next_toward(jnp.asarray(far[big]), up=True))
  candidate = moved.ravel().copy()
  candidate[big] = far[big].astype(np.float32)
  witness = dj.explain_releases(Wp, truth, 2).updates
  entries = np.concatenate([big, np.flatnonzero(moved != truth)[:2]])
  margins = identifiability.first_order_margins(
      Wp, truth, candidate.reshape(truth.shape), 2, witness, entries)
  assert (margins[:2] < 0).all() and (margins[2:] >= 0).all()


def test_auto_errors_at_low_rank_are_open_or_closed_to_first_order():
  """32x32 r=1, n=3 (layer 4 of the bf16 stack of ``research.bit_exact
  --dim=32 --rank=1``): the releases do not explain ``auto``'s output as a
  whole, yet 8 of its 10 wrong weights are open one by one (the true base
  with ``auto``'s value there is explained), and the other two are closed
  to first order at the true base's witness (margins -0.049 and -0.005):
  at most two weights the releases may determine are wrong. The thresholds
  allow one more of each."""
  W, Wp = lora_stack(0, 32, 32, 3, 1, layers=5, dtype=jnp.bfloat16)
  W, Wp = W[4], Wp[4]
  truth = np.asarray(W, np.float32)
  auto = np.asarray(dj.solve(jnp.asarray(Wp), 1, solver="auto")[0])
  assert np.mean(auto == truth) >= 0.985
  witness = dj.explain_releases(Wp, truth, 1)
  assert bool(witness.explained)
  opened, tested, _ = identifiability.swap_tests(
      Wp, truth, auto, 1, witness.updates, group=1, steps=8000, seed=0)
  assert (tested == (auto != truth)).all() and 0 < tested.sum() <= 11
  unopened = np.flatnonzero(tested & ~opened)
  assert unopened.size <= 3
  margins = identifiability.first_order_margins(Wp, truth, auto, 1,
                                                witness.updates, unopened)
  assert (margins < 0).all()


@pytest.mark.slow
def test_off_grid_binary(tmp_path):
  """``research.off_grid``: on releases rounded from a base on the grid
  the grid step gains and ``auto`` keeps it; on float32 merges each rounded
  on its own it loses and ``auto`` keeps the estimate before it."""
  out = tmp_path / "rows.json"
  proc = subprocess.run(
      [sys.executable, "-m", "research.off_grid", "--dim=64", "--rank=4",
       "--layers=1", "--ns=3", f"--json_out={out}"],
      capture_output=True, text=True, timeout=600,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = {r["model"]: r for r in json.loads(out.read_text())}
  on, off = rows["on_grid"], rows["off_grid"]
  assert on["kept_layers"] == 1 and off["kept_layers"] == 0
  assert on["consistent_min"] > 0.9 and off["consistent_max"] < 0.5
  assert on["after_bit_exact"] > on["before_bit_exact"] + 0.03
  assert on["auto_w_error"] == on["after_w_error"]
  assert off["after_w_error"] > off["before_w_error"] + 0.2
  assert off["auto_w_error"] == off["before_w_error"]
