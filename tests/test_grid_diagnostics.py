"""Checks of recoveries from low-precision releases
(detune_jax.solvers.grid_diagnostics)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import detune_jax as dj
from detune_jax.solvers import grid, grid_diagnostics
from test_grid import bf16_stack


def test_determined_fraction():
  key = jax.random.key(3)
  W = (jax.random.normal(key, (64, 48)) * 0.02).astype(jnp.bfloat16)
  M = jax.random.normal(jax.random.fold_in(key, 1), (5, 64, 48)) * 1e-3
  W_primes = (W.astype(jnp.float32)[None] + M).astype(jnp.bfloat16)
  det3, mid3 = grid_diagnostics.determined_fraction(W_primes[:3], M[:3], W)
  det5, mid5 = grid_diagnostics.determined_fraction(W_primes, M, W)
  # More releases narrow the intersection of the intervals.
  assert 0.9 <= det3 < det5 <= 1.0
  assert mid3 >= 0.9 and mid5 >= det5 - 0.01


def test_explain_releases_gives_a_witness_for_the_true_base_only():
  stacks = [bf16_stack(seed, 96, 80, n=3, rank=8) for seed in (4, 5)]
  W_primes = jnp.stack([s[1] for s in stacks])
  W_true = np.stack([np.asarray(s[0], np.float32) for s in stacks])
  # Layer 1's base one grid step off at a tenth of its entries.
  rng = np.random.default_rng(0)
  off = rng.random(W_true[1].shape) < 0.1
  W_bad = W_true.copy()
  W_bad[1] = np.where(off, np.asarray(grid._next_toward(
      stacks[1][0], up=True).astype(jnp.float32)), W_true[1])
  ex = dj.explain_releases(W_primes, W_bad, 8, max_steps=4000)
  assert ex.explained.tolist() == [True, False]
  assert ex.reproduced[0] == 1.0 and ex.reproduced[1] < 0.99
  assert ex.steps[1] == 4000 and ex.steps[0] < 4000
  # The witness, checked without the library: rank 8 and every released
  # value reproduced bit for bit.
  M = ex.updates[0]
  assert M.shape == (3, 96, 80) and M.dtype == np.float64
  assert [np.linalg.matrix_rank(m) for m in M] == [8, 8, 8]
  released = (W_true[0].astype(np.float64)[None] + M).astype(
      np.float32).astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(released.view(np.uint16),
                                np.asarray(W_primes[0]).view(np.uint16))
  # float16 releases: the true base explained, one of the releases not.
  W16, W16_primes = bf16_stack(4, 96, 80, n=3, rank=8, dtype=jnp.float16)
  assert bool(dj.explain_releases(W16_primes, W16, 8).explained)
  assert not bool(dj.explain_releases(W16_primes, W16_primes[0], 8,
                                      max_steps=1000).explained)
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    dj.explain_releases(W_primes.astype(jnp.float32), W_bad, 8)
  with pytest.raises(ValueError, match="relax"):
    dj.explain_releases(W_primes, W_bad, 8, relax=2.0)
  # Started from the true base's witness, the search ends at once for it,
  # and still finds none for the base that is off.
  again = dj.explain_releases(W_primes, W_bad, 8, max_steps=1000,
                              start=np.stack([M, M]))
  assert again.explained.tolist() == [True, False]
  assert again.steps[0] <= 250
  with pytest.raises(ValueError, match="start has shape"):
    dj.explain_releases(W_primes, W_bad, 8, start=M)


def test_explain_momentum_finds_witnesses_sooner():
  # 128x96 r=4, n=3: with momentum (the default) the true base's witness is
  # found within 250 projections and auto's output's within 1250; the
  # over-relaxed search without momentum (relax 1.9) needs 3750 for the true
  # base and 6500 for auto's output.
  W, W_primes = bf16_stack(0, 128, 96, n=3, rank=4)
  W_auto, _ = dj.solve(W_primes, 4, solver="auto")
  old = dict(relax=1.9, momentum=0.0)
  assert bool(dj.explain_releases(W_primes, W, 4, max_steps=1000).explained)
  assert not bool(dj.explain_releases(W_primes, W, 4, max_steps=1000,
                                      **old).explained)
  assert bool(dj.explain_releases(W_primes, W_auto, 4,
                                  max_steps=2000).explained)
  assert not bool(dj.explain_releases(W_primes, W_auto, 4, max_steps=4000,
                                      **old).explained)
  with pytest.raises(ValueError, match="momentum"):
    dj.explain_releases(W_primes, W, 4, momentum=1.0)


def test_grid_step_output_is_explained_by_the_releases():
  # What `research.bit_exact --explain` measures on the MiniLM
  # fine-tunes: the entries the grid step gets wrong are not determined by
  # the releases (they are exactly consistent with its output too).
  W, W_primes = bf16_stack(4, 96, 80, n=3, rank=8)
  W_cf, _ = dj.subspace_intersection_detuning(W_primes, 8)
  W_g, _ = dj.grid_refine(W_primes, W_cf, 8)
  assert 0.85 < float(dj.bit_exact_fraction(W_g, W)) < 1.0
  assert bool(dj.explain_releases(W_primes, W_g, 8).explained)


def test_explain_releases_reproduces_released_zeros():
  # A zero row in the base and in every LoRA's B: the releases hold exact
  # zeros, which a float64 witness can only match to its own precision.
  key = jax.random.key(0)
  W = (jax.random.normal(key, (48, 40)) * 0.02).at[0].set(0.0)
  W = W.astype(jnp.bfloat16)
  B = jax.random.normal(jax.random.fold_in(key, 1), (3, 48, 4)) * 0.02
  A = jax.random.normal(jax.random.fold_in(key, 2), (3, 4, 40)) * 0.02
  W_primes = (W.astype(jnp.float32)[None] + B.at[:, 0].set(0.0) @ A).astype(
      jnp.bfloat16)
  assert int(jnp.sum(W_primes == 0)) >= 120
  ex = dj.explain_releases(W_primes, W, 4, max_steps=4000)
  assert bool(ex.explained) and float(ex.reproduced) == 1.0
  # A base that is not zero there does not explain them.
  W_bad = W.astype(jnp.float32).at[0, :5].set(0.01)
  assert not bool(dj.explain_releases(W_primes, W_bad, 4,
                                      max_steps=1000).explained)


def test_first_order_margin_tells_which_changed_bases_are_explained():
  # The bit_exact swap tests' setting: the true base with one entry one grid
  # step up, and the true base's witness. Where every release's LP margin
  # is >= 0 the changed base is explained; where one is < 0 it is not.
  key = jax.random.key(3)
  W = (jax.random.normal(key, (64, 48)) * 0.02).astype(jnp.bfloat16)
  B = jax.random.normal(jax.random.fold_in(key, 1), (3, 64, 2)) * 0.02
  A = jax.random.normal(jax.random.fold_in(key, 2), (3, 2, 48)) * 0.02
  W_primes = (W.astype(jnp.float32)[None] + B @ A).astype(jnp.bfloat16)
  truth = np.asarray(W, np.float32)
  witness = dj.explain_releases(W_primes, truth, 2).updates
  assert (dj.first_order_margin(W_primes, truth, witness, 2) >= 0).all()
  up = np.asarray(grid._next_toward(W, up=True), np.float32)
  open_, closed = [(10, 28), (36, 44), (21, 24), (8, 7)], [(32, 38),
                                                           (61, 27),
                                                           (48, 38)]
  bases = np.repeat(truth[None], 7, 0)
  for base, e in zip(bases, open_ + closed):
    base[e] = up[e]
  L = len(bases)
  stacked = jnp.broadcast_to(W_primes, (L,) + W_primes.shape)
  starts = np.broadcast_to(witness, (L,) + witness.shape)
  margins = dj.first_order_margin(stacked, bases, starts, 2)
  assert margins.shape == (L, 3)
  assert (margins[:4] >= 0).all()
  assert (margins[4:].min(axis=1) < -0.05).all()
  ex = dj.explain_releases(stacked, bases, 2, max_steps=8000, start=starts)
  assert ex.explained.tolist() == [True] * 4 + [False] * 3
  # The LP's step is needed: without it the witness misses a value of each
  # changed base that is explained.
  lo, hi = (np.asarray(x, np.float64) for x in grid.rounding_interval(
      W_primes))
  for base in bases[:4:2]:
    S = base.astype(np.float64)[None] + witness
    assert (S < lo).any() or (S > hi).any()
  with pytest.raises(ValueError, match="updates"):
    dj.first_order_margin(W_primes, truth, witness[:2], 2)
