"""Named layer solvers, so that pipelines and binaries can pick one by name.

Every registered solver has the signature
``fn(W_primes, rank, *, steps, seed, **options) -> (W, Diagnostics)`` with
``W_primes`` of shape ``[n, d, k]`` or ``[L, n, d, k]``.
"""

from __future__ import annotations

from typing import Callable, Dict

import jax.numpy as jnp

from detune_jax.solvers.baselines import mean_lora
from detune_jax.solvers.spectral_detuning import Diagnostics, spectral_detuning

SOLVERS: Dict[str, Callable] = {}


def register_solver(name: str):
  """Decorator adding ``fn`` to :data:`SOLVERS` under ``name``."""
  def wrap(fn):
    SOLVERS[name] = fn
    return fn
  return wrap


@register_solver("spectral_detuning")
def _spectral_detuning(W_primes, rank, *, steps=300, seed=0, **options):
  return spectral_detuning(W_primes, rank, steps, seed=seed, **options)


@register_solver("mean_lora")
def _mean_lora(W_primes, rank, *, steps=300, seed=0, **options):
  del rank, steps, seed, options
  W_primes = jnp.asarray(W_primes)
  lead, n = W_primes.shape[:-3], W_primes.shape[-3]
  zeros = jnp.zeros(lead, jnp.float32)
  return mean_lora(W_primes), Diagnostics(
      loss=zeros[..., None], rank=jnp.zeros(lead + (1, n), jnp.int32),
      steps=jnp.zeros(lead, jnp.int32), final_rank=jnp.zeros(lead + (n,), jnp.int32),
      final_loss=zeros)


def solve(W_primes, rank, *, solver: str = "spectral_detuning", steps: int = 300,
          seed: int = 0, **options):
  """Runs the solver registered as ``solver``."""
  if solver not in SOLVERS:
    raise ValueError(f"unknown solver {solver!r}; known: {sorted(SOLVERS)}")
  return SOLVERS[solver](W_primes, rank, steps=steps, seed=seed, **options)
