"""The package's public names."""

import types

import detune_jax as dj


def test_all_lists_every_public_name():
  public = {n for n, v in vars(dj).items()
            if not n.startswith("_") and not isinstance(v, types.ModuleType)}
  assert public == set(dj.__all__)
  assert len(dj.__all__) == len(set(dj.__all__))
