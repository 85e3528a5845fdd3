"""Spreading batches of layers over devices (and hosts).

:func:`solve_layers` shards the layer axis of a ``[L, n, d, k]`` batch over a
1-D mesh of ``jax.devices()``; the solver is vmapped over layers, so each
device solves its own layers and the result equals the one-device result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from detune_jax.solvers.registry import solve

LAYER_AXIS = "layers"


def layer_mesh(devices=None):
  """A 1-D mesh over ``devices`` (default: all) named ``"layers"``."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.sharding.Mesh(devices, (LAYER_AXIS,))


def solve_layers(W_primes, rank, *, devices=None, **kwargs):
  """Solves a ``[L, n, d, k]`` batch with its layer axis sharded over devices.

  Args:
    W_primes: ``[L, n, d, k]``.
    rank: as for :func:`detune_jax.spectral_detuning`.
    devices: devices to use (default ``jax.devices()``).
    **kwargs: passed to :func:`detune_jax.solvers.registry.solve`.

  Returns:
    ``(W [L, d, k], diagnostics)`` as numpy-backed arrays on the host device.
  """
  devices = jax.devices() if devices is None else list(devices)
  L = W_primes.shape[0]
  if len(devices) == 1 or L == 1:
    return solve(W_primes, rank, **kwargs)
  pad = (-L) % len(devices)
  W_primes = jnp.asarray(W_primes)
  if pad:
    W_primes = jnp.concatenate(
        [W_primes, jnp.repeat(W_primes[-1:], pad, axis=0)], axis=0)
  sharding = NamedSharding(layer_mesh(devices), P(LAYER_AXIS))
  W, diag = solve(jax.device_put(W_primes, sharding), rank, **kwargs)
  return jax.tree.map(lambda x: x[:L], (W, diag))
