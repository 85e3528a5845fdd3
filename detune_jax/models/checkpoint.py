"""Model checkpoints for the ports: HF directories, safetensors files, orbax.

A port declares its parameters as an NNX module and one name table from its
NNX parameter paths to HF tensor names; :func:`load_params` fills the module
from a checkpoint through that table and refuses, naming the tensor, anything
missing, extra or mis-shaped. Checkpoints are read with the project's own
reader (:class:`detune_jax.io.ModelFiles`: one ``.safetensors`` file, or an
HF directory with one file or shards), so the files ``experiments.recover``
writes load directly; an orbax checkpoint written by ``experiments.convert``
loads too. Pickle checkpoints are refused, never opened.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from detune_jax.io.errors import BadInputError
from detune_jax.io import checkpoints

# A name-table row: an NNX parameter path and its HF tensor name, both with
# ``{i}`` standing for a layer index.
NameTable = Sequence[Tuple[str, str]]


def config_dir(path: str) -> str:
  """The directory whose ``config.json`` describes the model at ``path``."""
  return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def read_config(path: str, config: Optional[Mapping] = None) -> dict:
  """The HF ``config.json`` of a model: given, in its directory, or beside
  its safetensors file."""
  if config is not None:
    return dict(config)
  file = os.path.join(config_dir(path), "config.json")
  if not os.path.exists(file):
    raise BadInputError(path, "no config.json beside the weights; pass the "
                        "reference model's directory (its config.json) too")
  try:
    with open(file) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise BadInputError(file, f"unreadable config: {e}") from None


def read_tensors(path: str) -> Dict[str, np.ndarray]:
  """Every tensor of a checkpoint, by HF name (memory-mapped where it can)."""
  return checkpoints.read_checkpoint(path).tensors


def _pattern(template: str) -> re.Pattern:
  return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


def hf_names(model: nnx.Module, table: NameTable) -> Dict[Tuple, str]:
  """Each NNX parameter path of ``model`` mapped to its HF tensor name."""
  rows = [(_pattern(nnx_path), hf) for nnx_path, hf in table]
  out = {}
  for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    dotted = ".".join(str(p) for p in path)
    for pattern, hf in rows:
      m = pattern.match(dotted)
      if m:
        out[path] = hf.replace("{i}", m.group(1)) if m.groups() else hf
        break
    else:
      raise KeyError(f"no HF name for parameter {dotted}")
  return out


def load_params(model: nnx.Module, tensors: Mapping[str, np.ndarray],
                table: NameTable, *, source: str, dtype=jnp.float32,
                ignore: Sequence[str] = ()) -> nnx.Module:
  """Fills ``model``'s parameters from ``tensors`` (HF names) in ``dtype``.

  Args:
    model: a port, possibly abstract (built under ``nnx.eval_shape``).
    tensors: HF name -> array.
    table: the port's name table.
    source: the checkpoint's path, for error messages.
    dtype: compute dtype of the parameters.
    ignore: regular expressions of HF names that may be present and unused
      (buffers such as ``embeddings.position_ids``).

  Returns:
    ``model``, updated in place.

  Raises:
    BadInputError: a parameter is missing or has the wrong shape, or a tensor
      is not a parameter of the model.
  """
  names = hf_names(model, table)
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  used = set()
  for path, var in flat:
    name = names[path]
    if name not in tensors:
      raise BadInputError(source, "missing parameter", tensor=name)
    value = np.asarray(tensors[name])
    if tuple(value.shape) != tuple(var.shape):
      raise BadInputError(source, f"shape {list(value.shape)}, the config "
                          f"says {list(var.shape)}", tensor=name)
    var.set_value(jnp.asarray(value, dtype))
    used.add(name)
  ignored = [re.compile(p) for p in ignore]
  for name in tensors:
    if name not in used and not any(p.fullmatch(name) for p in ignored):
      raise BadInputError(source, "not a parameter of this model (extra "
                          "tensor)", tensor=name)
  return model


def strip_prefix(tensors: Mapping[str, np.ndarray],
                 prefix: str) -> Dict[str, np.ndarray]:
  """Names without ``prefix`` where it starts them (task-model checkpoints
  nest the encoder under e.g. ``bert.``)."""
  return {n[len(prefix):] if n.startswith(prefix) else n: v
          for n, v in tensors.items()}


class Functional(NamedTuple):
  """A port as a pure function of its HF-named weights.

  Attributes:
    graphdef: the module's structure (``nnx.split``).
    paths: ``((hf_name, nnx_path), ...)`` of every parameter.
    tensors: the module's own weights by HF name.
  """
  graphdef: object
  paths: Tuple[Tuple[str, Tuple], ...]
  tensors: Dict[str, object]

  def module(self, tensors: Mapping[str, object]) -> nnx.Module:
    """The module computing with ``tensors`` (HF names; jit-traceable, so
    a LoRA-merged weight can be differentiated through)."""
    tree: dict = {}
    for hf, path in self.paths:
      node = tree
      for p in path[:-1]:
        node = node.setdefault(p, {})
      node[path[-1]] = tensors[hf]
    return nnx.merge(self.graphdef, tree)


def functional(model: nnx.Module, table: NameTable) -> Functional:
  """``model`` split into its structure and its weights by HF name, through
  the port's name table."""
  graphdef, state = nnx.split(model)
  paths = tuple(sorted((hf, path)
                       for path, hf in hf_names(model, table).items()))
  flat = {tuple(path): var for path, var in nnx.to_flat_state(state)}
  return Functional(graphdef, paths,
                    {hf: flat[path][...] for hf, path in paths})
