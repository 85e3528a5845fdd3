"""Closed-form detuning by subspace intersection: exactness, n=2, API."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import detune_jax as dj
from detune_jax.solvers import closed_form, registry
from detune_jax.synthetic import lora_stack


def test_n3_exact_recovery_small():
  W, W_primes = lora_stack(0, 64, 48, n=3, rank=4)
  W_rec, diag = dj.subspace_intersection_detuning(W_primes, rank=4)
  assert W_rec.shape == (64, 48) and W_rec.dtype == jnp.float32
  assert float(dj.w_error(W_rec, W)) <= -12.0
  assert float(dj.w_error(dj.mean_lora(W_primes), W)) > -9.0
  # Well-posed: each LoRA's subspaces intersect exactly (c_r = 1) and are
  # separated from the rest (gap well above 0).
  np.testing.assert_allclose(diag.col_cos[:, 0], 1.0, atol=1e-4)
  np.testing.assert_allclose(diag.row_cos[:, 0], 1.0, atol=1e-4)
  assert (np.asarray(diag.gap) > 0.3).all()
  assert 0.0 < float(diag.core_min_eig) <= 1.0
  assert float(diag.final_loss) < 1e-14
  assert int(diag.steps) == 0


@pytest.mark.slow
def test_n3_vit_shape_float32_precision_one_shot():
  """W-Error <= -15 at 768x768, r=16, in one shot.

  How much faster that is than 300 steps is measured by the benchmark
  binary (``python -m experiments.bench_closed_form``; docs/results.md,
  "Closed form against 300 steps: time": 0.086 s against 0.252 s at n=3),
  not here: a timed test fails on a shared machine (beside another job the
  closed form has taken 0.6-9 s).
  """
  W, W_primes = lora_stack(0, 768, 768, n=3, rank=16)
  W_rec, diag = dj.subspace_intersection_detuning(W_primes, 16)
  assert float(dj.w_error(W_rec, W)) <= -15.0
  assert int(diag.steps) == 0          # no refinement step was needed


def test_n2_is_a_clear_error():
  _, W_primes = lora_stack(0, 32, 24, n=2, rank=2)
  with pytest.raises(dj.NotIdentifiableError, match="at least 3"):
    dj.subspace_intersection_detuning(W_primes, rank=2)
  with pytest.raises(ValueError, match="infinitely many"):
    registry.solve(W_primes, 2, solver="closed_form")


def test_ranks_too_large_is_a_clear_error():
  _, W_primes = lora_stack(0, 16, 16, n=3, rank=6)
  with pytest.raises(dj.NotIdentifiableError, match="too large"):
    dj.subspace_intersection_detuning(W_primes, rank=6)


def test_per_lora_ranks_and_more_fine_tunes():
  ranks = (2, 4, 6, 3)
  W, W_primes = lora_stack(3, 72, 56, n=4, rank=ranks)
  W_rec, diag = dj.subspace_intersection_detuning(W_primes, rank=ranks)
  assert float(dj.w_error(W_rec, W)) <= -12.0
  np.testing.assert_array_equal(diag.final_rank, ranks)
  assert diag.gap.shape == (4,)


def test_exact_and_randomized_pair_svd_agree():
  W, W_primes = lora_stack(4, 48, 40, n=3, rank=3)
  a, _ = dj.subspace_intersection_detuning(W_primes, 3, svd="exact")
  b, _ = dj.subspace_intersection_detuning(W_primes, 3, svd="randomized")
  assert float(dj.w_error(a, W)) <= -12.0
  assert float(dj.w_error(b, W)) <= -12.0


def test_conjugate_gradient_core_solver(monkeypatch):
  monkeypatch.setattr(closed_form, "DENSE_CORE_LIMIT", 0)
  W, W_primes = lora_stack(5, 64, 48, n=3, rank=4)
  W_rec, diag = dj.subspace_intersection_detuning(W_primes, 4, seed=1)
  assert float(dj.w_error(W_rec, W)) <= -12.0
  assert 0.0 < float(diag.core_min_eig) <= 1.0


def test_layer_batch_equals_per_layer_and_runs_under_jit():
  stacks = [lora_stack(s, 40, 32, n=3, rank=3) for s in range(3)]
  W_true = jnp.stack([w for w, _ in stacks])
  W_primes = jnp.stack([wp for _, wp in stacks])
  W_b, diag = dj.subspace_intersection_detuning(W_primes, 3)
  assert W_b.shape == (3, 40, 32) and diag.gap.shape == (3, 3)
  for layer in range(3):
    W_l, _ = dj.subspace_intersection_detuning(W_primes[layer], 3)
    np.testing.assert_allclose(W_b[layer], W_l, atol=1e-6)
  assert float(dj.w_error(W_b, W_true)) <= -12.0
  fn = jax.jit(jax.vmap(lambda s: closed_form._solve_layer(  # pylint: disable=protected-access
      s, jax.random.key(0), ranks=(3, 3, 3), svd="exact", oversample=0,
      niter=0)[0]))
  assert float(dj.w_error(fn(W_primes), W_true)) <= -12.0


def test_shared_directions_shrink_the_gap():
  _, indep = lora_stack(6, 64, 48, n=3, rank=4)
  _, shared = lora_stack(6, 64, 48, n=3, rank=4, shared=0.9)
  g_indep = float(dj.subspace_intersection_detuning(indep, 4)[1].gap.min())
  g_shared = float(dj.subspace_intersection_detuning(shared, 4)[1].gap.min())
  assert g_shared < g_indep


def test_seeds_spectral_detuning():
  W, W_primes = lora_stack(7, 64, 48, n=3, rank=4)
  W_cf, _ = dj.subspace_intersection_detuning(W_primes, 4)
  fixed = dj.RankSchedule(kind="fixed")
  W_ref, diag = dj.spectral_detuning(W_primes, 4, 20, init=W_cf,
                                     schedule=fixed)
  assert float(dj.w_error(W_ref, W)) <= -12.0
  assert float(diag.loss[0]) < 1e-12


@pytest.mark.parametrize("solver", ["closed_form", "closed_form+refine",
                                    "auto"])
def test_registry(solver):
  W, W_primes = lora_stack(8, 48, 40, n=3, rank=3)
  W_rec, diag = registry.solve(W_primes, 3, solver=solver, steps=30)
  assert float(dj.w_error(W_rec, W)) <= -12.0
  for field in ("loss", "rank", "steps", "final_rank", "final_loss"):
    assert hasattr(diag, field)


@pytest.mark.parametrize("shared", [0.0, 0.8])
def test_auto_polish_beats_closed_form_and_long_refinement(shared):
  # Float32 merges of exact LoRAs: the closed form stops above the float32
  # floor; auto's polishing step and refinement go below it (-17.9 -> -18.8
  # measured, independent factors). With shared directions 300 steps from the
  # closed form drift away by noise (-17.6 -> -16.3) and auto does not.
  W, W_primes = lora_stack(0, 96, 80, n=3, rank=4, shared=shared)
  err = {s: float(dj.w_error(registry.solve(W_primes, 4, solver=s,
                                            steps=300)[0], W))
         for s in ("closed_form", "auto", "closed_form+refine")}
  assert err["auto"] <= err["closed_form"] - (0.5 if shared == 0 else 0.05)
  if shared:
    assert err["auto"] <= err["closed_form+refine"] - 0.8, err
  _, diag = registry.solve(W_primes, 4, solver="auto")
  assert int(diag.steps) == registry.POLISH_STEPS


def test_auto_falls_back_to_spectral_detuning_at_n2():
  W, W_primes = lora_stack(9, 48, 40, n=2, rank=2)
  W_rec, diag = registry.solve(W_primes, 2, solver="auto", steps=50)
  assert int(diag.steps) == 50  # the iterative method ran
  assert W_rec.shape == W.shape and bool(jnp.isfinite(W_rec).all())


def test_auto_batched_layers():
  stacks = [lora_stack(s, 40, 32, n=3, rank=3, shared=0.99 if s == 1 else 0.0)
            for s in range(3)]
  W_true = jnp.stack([w for w, _ in stacks])
  W_primes = jnp.stack([wp for _, wp in stacks])
  W_rec, diag = registry.solve(W_primes, 3, solver="auto", steps=30,
                               min_gap=0.2)
  assert W_rec.shape == (3, 40, 32)
  assert diag.final_loss.shape == (3,)
  errs = dj.layer_w_errors(W_rec, W_true)
  assert float(errs[0]) <= -12.0 and float(errs[2]) <= -12.0
