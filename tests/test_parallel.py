"""Sharding the layer axis over devices: same results as one device.

The 8-device checks run in a subprocess (the script ``EIGHT_DEVICES`` below),
because ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` has to be set
before jax is imported.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import detune_jax
from detune_jax import parallel
from detune_jax.synthetic import lora_stack


EIGHT_DEVICES = r'''"""8 fake CPU devices: solve_layers equals a one-device solve."""

import os
import sys

assert "--xla_force_host_platform_device_count=8" in os.environ.get(
    "XLA_FLAGS", ""), "set XLA_FLAGS before running this script"

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from detune_jax import parallel  # pylint: disable=g-import-not-at-top
from detune_jax.synthetic import lora_stack  # pylint: disable=g-import-not-at-top


def main():
  devices = jax.devices()
  assert len(devices) == 8, devices
  for L, svd in ((8, "subspace"), (11, "subspace"), (5, "randomized")):
    stacks, truths = zip(*[lora_stack(s, 48, 40, n=4, rank=3)[::-1]
                           for s in range(L)])
    batch = jnp.stack(stacks)
    W8, d8 = parallel.solve_layers(batch, 3, steps=60, svd=svd)
    W1, d1 = parallel.solve_layers(batch, 3, steps=60, svd=svd,
                                   devices=devices[:1])
    assert W8.shape == (L, 48, 40), W8.shape
    # Same program per layer on every device: identical up to float32
    # reassociation (observed: bit-identical).
    np.testing.assert_allclose(W8, W1, atol=1e-7, rtol=0)
    np.testing.assert_array_equal(d8.rank, d1.rank)
    np.testing.assert_array_equal(d8.steps, d1.steps)
    exact = bool(np.array_equal(np.asarray(W8), np.asarray(W1)))
    err = float(jnp.mean(jax.vmap(lambda a, b: jnp.log10(jnp.mean((a - b) ** 2)))(
        W8, jnp.stack(truths))))
    assert err < -12, err
    print(f"L={L} svd={svd}: bit-identical={exact} w_error={err:.2f}")
  # The input really is spread: one shard of the layer axis per device.
  batch = jnp.stack([lora_stack(s, 16, 16, n=3, rank=1)[1] for s in range(8)])
  sharding = jax.sharding.NamedSharding(parallel.layer_mesh(),
                                        jax.sharding.PartitionSpec("layers"))
  placed = jax.device_put(batch, sharding)
  assert len({s.device for s in placed.addressable_shards}) == 8
  W, _ = parallel.solve_layers(placed, 1, steps=10)
  assert len(W.sharding.device_set) == 8, W.sharding
  print("OK 8 devices")


if __name__ == "__main__":
  sys.exit(main())
'''


def test_one_device_solve_layers_equals_solver():
  batch = jnp.stack([lora_stack(s, 40, 32, n=3, rank=2)[1] for s in range(3)])
  W, diag = parallel.solve_layers(batch, 2, steps=40)
  for l in range(3):
    W_l, diag_l = detune_jax.spectral_detuning(batch[l], 2, 40)
    np.testing.assert_allclose(W[l], W_l, atol=1e-6)
    np.testing.assert_array_equal(diag.rank[l], diag_l.rank)


def test_layer_mesh_is_one_dimensional():
  mesh = parallel.layer_mesh()
  assert mesh.axis_names == (parallel.LAYER_AXIS,)
  assert mesh.devices.size == len(jax.devices())


@pytest.mark.slow
def test_eight_fake_cpu_devices_match_one_device():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], env=env,
                       capture_output=True,
                       text=True, timeout=900, check=False)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  assert "OK 8 devices" in out.stdout
