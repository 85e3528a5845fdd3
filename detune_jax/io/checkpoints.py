"""Model checkpoints in three forms, converted bit for bit.

* an HF directory: ``config.json`` (and tokenizer files) beside one
  ``model.safetensors`` or shards with an index;
* one ``.safetensors`` file with HF tensor names;
* an orbax checkpoint directory: the tensors under ``params/`` (orbax's
  PyTree checkpointer), ``tensors.json`` with each tensor's dtype and shape
  (orbax keeps neither 0-d nor empty arrays as arrays) and the safetensors
  metadata, and the HF directory's other files beside them.

:func:`read_checkpoint` reads any of them; :func:`write_checkpoint` writes
any of them into a temporary sibling that is renamed into place when done,
so a failed conversion leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, NamedTuple, Optional

import numpy as np

from detune_jax.io.errors import BadInputError
from detune_jax.io.models import INDEX_SUFFIX, PICKLE_SUFFIXES, ModelFiles
from detune_jax.io.models import write_model
from detune_jax.io.safetensors_io import DTYPES, dtype_name

ORBAX_PARAMS = "params"
ORBAX_INDEX = "tensors.json"
WEIGHT_SUFFIXES = (".safetensors", INDEX_SUFFIX) + PICKLE_SUFFIXES


class Checkpoint(NamedTuple):
  tensors: Dict[str, np.ndarray]   # HF name -> array, in file order
  metadata: Dict[str, str]         # safetensors __metadata__
  side_files: Dict[str, str]       # file name -> path (config, tokenizer...)


def is_orbax(path: str) -> bool:
  """Whether ``path`` is an orbax checkpoint written by this module."""
  return os.path.isfile(os.path.join(path, ORBAX_INDEX))


def side_files(model_dir: str) -> Dict[str, str]:
  """The files of a model directory that are not weights (config,
  tokenizer, ...), by name; sub-folders are left out."""
  if not os.path.isdir(model_dir):
    return {}
  out = {}
  for name in sorted(os.listdir(model_dir)):
    path = os.path.join(model_dir, name)
    if os.path.isfile(path) and not name.endswith(WEIGHT_SUFFIXES) \
        and name != ORBAX_INDEX:
      out[name] = path
  return out


def read_checkpoint(path: str) -> Checkpoint:
  """Every tensor of an HF directory, safetensors file or orbax checkpoint."""
  if is_orbax(path):
    return _read_orbax(path)
  model = ModelFiles(path)
  tensors = {name: model.read(name)
             for _, names in model.layout() for name in names}
  return Checkpoint(tensors, dict(model.metadata), side_files(path))


def _read_orbax(path: str) -> Checkpoint:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  index_file = os.path.join(path, ORBAX_INDEX)
  try:
    with open(index_file) as f:
      index = json.load(f)
    stored = ocp.PyTreeCheckpointer().restore(
        os.path.abspath(os.path.join(path, ORBAX_PARAMS)))
  except Exception as e:  # a damaged checkpoint raises many types
    raise BadInputError(path, f"unreadable orbax checkpoint: {e}") from None
  tensors = {}
  for name, spec in index["tensors"].items():
    dtype = np.dtype(DTYPES[spec["dtype"]])
    shape = tuple(spec["shape"])
    if name in stored:
      value = np.asarray(stored[name])
      if value.dtype != dtype or value.size != int(np.prod(shape)):
        raise BadInputError(path, f"stored as {value.dtype}{list(value.shape)}"
                            f", the index says {spec}", tensor=name)
      tensors[name] = value.reshape(shape)
    else:
      tensors[name] = np.zeros(shape, dtype)  # empty: nothing to store
  return Checkpoint(tensors, index.get("metadata", {}), side_files(path))


def write_checkpoint(ckpt: Checkpoint, dest: str, form: str):
  """Writes ``ckpt`` to ``dest`` as ``form``: "orbax", "hf" or
  "safetensors"; ``dest`` must not exist."""
  if os.path.lexists(dest):
    raise BadInputError(dest, "already exists; not overwriting it")
  parent = os.path.dirname(os.path.abspath(dest))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
  try:
    if form == "safetensors":
      out = os.path.join(tmp, "model.safetensors")
      write_model(tmp, ckpt.tensors, metadata=ckpt.metadata)
      os.replace(out, dest)
      return
    if form == "orbax":
      _write_orbax(ckpt, tmp)
    elif form == "hf":
      write_model(tmp, ckpt.tensors, metadata=ckpt.metadata)
    else:
      raise ValueError(f"unknown checkpoint form {form!r}")
    for name, path in ckpt.side_files.items():
      shutil.copyfile(path, os.path.join(tmp, name))
    os.replace(tmp, dest)
    tmp = None
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)


def _write_orbax(ckpt: Checkpoint, out_dir: str):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  index = {name: {"dtype": dtype_name(v.dtype), "shape": list(v.shape)}
           for name, v in ckpt.tensors.items()}
  # orbax stores neither 0-d arrays (they come back as Python scalars) nor
  # empty ones; the index restores their shapes.
  stored = {name: np.ascontiguousarray(v).reshape(-1)
            for name, v in ckpt.tensors.items() if v.size}
  ocp.PyTreeCheckpointer().save(os.path.join(out_dir, ORBAX_PARAMS), stored)
  with open(os.path.join(out_dir, ORBAX_INDEX), "w") as f:
    json.dump({"tensors": index, "metadata": ckpt.metadata}, f, indent=1)


def default_form(src: str, dest: str) -> str:
  """The form ``experiments.convert`` writes when not told: a
  ``.safetensors`` file by its suffix, else orbax from HF and HF from
  orbax."""
  if dest.endswith(".safetensors"):
    return "safetensors"
  return "hf" if is_orbax(src) else "orbax"
