"""The synthetic-stack builder and the release rounding."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from detune_jax.io import ModelFiles
from detune_jax.io.synthetic import make_lora_models
from detune_jax.synthetic import lora_stack, release


def test_layers_and_fine_tunes_extend_the_same_draw():
  W, Wp = lora_stack(3, 24, 20, n=4, rank=3)
  W_l, Wp_l = lora_stack(3, 24, 20, n=5, rank=3, layers=2)
  assert W_l.shape == (2, 24, 20) and Wp_l.shape == (2, 5, 24, 20)
  np.testing.assert_array_equal(W_l[0], W)
  np.testing.assert_array_equal(Wp_l[0, :4], Wp)
  assert not np.array_equal(W_l[1], W)
  # n = 0: the base alone.
  W0, Wp0 = lora_stack(3, 24, 20, n=0, rank=3, layers=2)
  np.testing.assert_array_equal(W0, W_l)
  assert Wp0.shape == (2, 0, 24, 20)


def test_per_lora_ranks_and_shared_factors():
  W, Wp = lora_stack(0, 40, 32, n=3, rank=(2, 3, 5))
  assert [int(np.linalg.matrix_rank(np.asarray(Wp[i] - W, np.float64),
                                    tol=1e-7)) for i in range(3)] == [2, 3, 5]
  # Correlated LoRAs: their column spaces overlap far more than independent
  # ones do.
  _, indep = lora_stack(1, 64, 48, n=2, rank=4)
  W_s, shared = lora_stack(1, 64, 48, n=2, rank=4, shared=0.9)

  def overlap(Wp, W):
    Q = [np.linalg.svd(np.asarray(Wp[i] - W, np.float64))[0][:, :4]
         for i in range(2)]
    return np.linalg.norm(Q[0].T @ Q[1]) ** 2 / 4

  assert overlap(shared, W_s) > 0.5 > 0.2 > overlap(indep, W_s)
  with pytest.raises(ValueError, match="shared"):
    lora_stack(0, 8, 8, n=2, rank=1, shared=1.0)
  with pytest.raises(ValueError, match="2 ranks for n=3"):
    lora_stack(0, 8, 8, n=3, rank=(1, 2))


def test_a_low_precision_stack_is_the_float32_one_released():
  kw = dict(n=3, rank=2, layers=2, shared=0.5)
  W, Wp = lora_stack(0, 16, 12, dtype=jnp.bfloat16, **kw)
  W32, Wp32 = lora_stack(0, 16, 12, **kw)
  assert W.dtype == jnp.bfloat16 and Wp.shape == (2, 3, 16, 12)
  W_r, Wp_r = release(W32, Wp32, "bfloat16")
  np.testing.assert_array_equal(np.asarray(W), W_r)
  # The merge is rounded once either way; W + (W' - W) in float32 may differ
  # from W + B A in its last bit, so a few entries may round apart.
  assert np.mean(np.asarray(Wp) != Wp_r) < 1e-3
  np.testing.assert_allclose(np.asarray(Wp, np.float32), Wp32, atol=1e-3)


def test_release_with_and_without_the_base_on_the_grid():
  W, Wp = lora_stack(2, 32, 24, n=3, rank=2, layers=2)
  W_on, Wp_on = release(W, Wp, "bfloat16")
  W_off, Wp_off = release(W, Wp, "bfloat16", rebase=False)
  assert W_on.dtype == ml_dtypes.bfloat16 == Wp_off.dtype
  np.testing.assert_array_equal(W_on, W_off)
  np.testing.assert_array_equal(Wp_off, np.asarray(Wp).astype(
      ml_dtypes.bfloat16))
  M = np.asarray(Wp) - np.asarray(W)[:, None]
  np.testing.assert_array_equal(
      Wp_on, (W_on.astype(np.float32)[:, None] + M).astype(ml_dtypes.bfloat16))
  W32, Wp32 = release(W, Wp, "float32")
  np.testing.assert_array_equal(Wp32, np.asarray(Wp))


def test_lora_std_sets_the_size_of_the_updates():
  W, Wp = lora_stack(4, 256, 192, n=2, rank=(4, 16), lora_std=0.01)
  for i in range(2):
    assert 0.009 < float(jnp.std(Wp[i] - W)) < 0.011
  assert 0.019 < float(jnp.std(W)) < 0.021


def test_model_files_hold_the_builder_draw(tmp_path):
  layers = {"a.weight": (24, 20), "conv.weight": (8, 2, 3, 3)}
  frozen = {"bias": (24,)}
  models, base = make_lora_models(str(tmp_path), n=3, ranks=[1, 2, 3],
                                  layers=layers, frozen=frozen, seed=5,
                                  dtype=ml_dtypes.bfloat16)
  key = jax.random.key(5)
  for j, (name, shape) in enumerate(layers.items()):
    k = int(np.prod(shape[1:]))
    W, Wp = lora_stack(jax.random.fold_in(key, j), shape[0], k, 3, [1, 2, 3],
                       lora_std=0.02, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(ModelFiles(base).read(name),
                                  np.asarray(W).reshape(shape))
    for i, path in enumerate(models):
      np.testing.assert_array_equal(ModelFiles(path).read(name),
                                    np.asarray(Wp[i]).reshape(shape))
  bias = [np.asarray(ModelFiles(p).read("bias")) for p in models + [base]]
  assert all(np.array_equal(b, bias[0]) for b in bias)
