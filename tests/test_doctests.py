"""The ``>>>`` examples in the package's docstrings run and hold.

Every module of ``detune_jax`` whose source holds an example is run: a new
module's examples are tested without being listed here.
"""

import doctest
import importlib
import pkgutil

import pytest

import detune_jax


def _modules_with_examples():
  names = []
  for info in pkgutil.walk_packages(detune_jax.__path__, "detune_jax."):
    spec = importlib.util.find_spec(info.name)
    if spec and spec.origin and spec.origin.endswith(".py"):
      with open(spec.origin) as f:
        if ">>>" in f.read():
          names.append(info.name)
  return ["detune_jax"] + sorted(names)


MODULES = _modules_with_examples()


def test_the_examples_are_found():
  assert {"detune_jax.solvers.grid", "detune_jax.solvers.closed_form",
          "detune_jax.pipeline"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name),
                           optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0, f"{name} has no examples"
  assert result.failed == 0
