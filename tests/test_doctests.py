"""The ``>>>`` examples in the public docstrings run and hold."""

import doctest
import importlib

import pytest

MODULES = [
    "detune_jax.metrics",
    "detune_jax.synthetic",
    "detune_jax.solvers.schedule",
    "detune_jax.solvers.lowrank",
    "detune_jax.solvers.spectral_detuning",
    "detune_jax.solvers.rank_estimation",
    "detune_jax.solvers.detection",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name),
                           optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f"{name} has no examples"
  assert result.failed == 0
