"""W-Error, Eq. 3 loss, baselines and fine-tuned layer detection."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import detune_jax as dj
from detune_jax.metrics import MSE_FLOOR
from detune_jax.synthetic import lora_stack


def test_w_error_of_one_layer_is_log10_mse():
  W_true = jnp.zeros((4, 5))
  assert float(dj.w_error(W_true + 1e-3, W_true)) == pytest.approx(-6.0)
  assert float(dj.w_error(W_true, W_true)) == pytest.approx(np.log10(MSE_FLOOR))


def test_w_error_is_mean_over_layers_of_log_mse():
  a, b = jnp.zeros((3, 3)), jnp.zeros((6, 2))
  layers = [a + 1e-2, b + 1e-4]
  assert float(dj.w_error(layers, [a, b])) == pytest.approx((-4 - 8) / 2)
  assert float(dj.w_error({"x": a + 1e-2, "y": b + 1e-4},
                          {"x": a, "y": b})) == pytest.approx(-6.0)
  batch = jnp.stack([a + 1e-1, a + 1e-3])          # [L, d, k]
  np.testing.assert_allclose(dj.layer_w_errors(batch, jnp.zeros_like(batch)),
                             [-2.0, -6.0], rtol=1e-5)
  assert float(dj.w_error(batch, jnp.zeros_like(batch))) == pytest.approx(-4.0)


def test_w_error_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match="shape"):
    dj.w_error(jnp.zeros((2, 3)), jnp.zeros((3, 2)))


def test_w_error_runs_under_jit():
  f = jax.jit(dj.w_error)
  assert float(f(jnp.ones((2, 2)) * 1e-2, jnp.zeros((2, 2)))) == pytest.approx(-4)


def test_detuning_loss_is_zero_at_the_truth_and_positive_elsewhere():
  W, W_primes = lora_stack(0, 32, 24, n=3, rank=(2, 3, 4))
  assert float(dj.detuning_loss(W_primes, W, (2, 3, 4))) < 1e-14
  assert float(dj.detuning_loss(W_primes, dj.mean_lora(W_primes),
                                (2, 3, 4))) > 1e-10


def test_mean_lora_and_lora_ft_baselines():
  W, W_primes = lora_stack(1, 32, 24, n=4, rank=2)
  np.testing.assert_allclose(dj.mean_lora(W_primes), W_primes.mean(0),
                             atol=1e-7)
  batch = jnp.stack([W_primes, W_primes])
  assert dj.mean_lora(batch).shape == (2, 32, 24)
  per_model = [float(dj.w_error(W_primes[i], W)) for i in range(4)]
  assert float(dj.lora_ft_w_error(W_primes, W)) == pytest.approx(
      np.mean(per_model), rel=1e-5)
  # Averaging cancels part of the independent updates.
  assert float(dj.w_error(dj.mean_lora(W_primes), W)) < min(per_model)


def test_is_finetuned_compares_bits_in_any_dtype():
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  assert not dj.is_finetuned([x, x.copy(), x.copy()])
  y = x.copy()
  y[1, 2] = np.nextafter(y[1, 2], np.float32(10))
  assert dj.is_finetuned([x, x, y])
  xb = x.astype(ml_dtypes.bfloat16)
  assert not dj.is_finetuned([xb, xb.copy()])
  assert dj.is_finetuned([xb, (x + 1).astype(ml_dtypes.bfloat16)])
  # -0.0 == 0.0 numerically but the release differs bitwise.
  assert dj.is_finetuned([np.zeros(2, np.float32), -np.zeros(2, np.float32)])
