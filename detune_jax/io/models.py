"""Models on disk: one safetensors file, or an HF-style directory (one
``model.safetensors`` or shards plus ``*.safetensors.index.json``).

Tensors are never loaded eagerly: :meth:`ModelFiles.read` returns a
memory-mapped view. Pickle checkpoints (``.bin``, ``.pt``, ...) are refused by
name and never opened; so are PEFT adapters (``adapter_config.json``,
``adapter_model.safetensors``), which are not merged models.
"""

from __future__ import annotations

import errno
import glob
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from detune_jax.io.errors import BadInputError
from detune_jax.io.safetensors_io import (DTYPES, SafetensorsFile,
                                          SafetensorsWriter, TensorInfo)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_SUFFIX = ".safetensors.index.json"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _refuse_peft(path):
  raise BadInputError(path, "is a PEFT adapter, not a merged model: merge it "
                      "with python -m experiments.merge_peft first")


def _refuse_pickle(path):
  raise BadInputError(path, "refusing a pickle checkpoint: it could run code "
                      "when loaded; convert it to .safetensors first")


class ModelFiles:
  """A model's tensors across one or more safetensors files.

  Attributes:
    path: the file or directory given.
    shards: ``[(file name, SafetensorsFile)]`` in shard order.
    names: all tensor names, shard by shard in data order.
    sharded: True when read through an index file.
    index_metadata: the index's ``metadata`` (sharded models).
  """

  def __init__(self, path):
    self.path = str(path)
    self.sharded = False
    self.index_metadata: Dict = {}
    _check_exists(self.path)
    if os.path.isdir(self.path):
      if any(os.path.exists(os.path.join(self.path, f)) for f in PEFT_FILES):
        _refuse_peft(self.path)
      files = self._dir_files()
    else:
      if os.path.basename(self.path) in PEFT_FILES:
        _refuse_peft(self.path)
      if self.path.lower().endswith(PICKLE_SUFFIXES):
        _refuse_pickle(self.path)
      if not self.path.endswith(".safetensors"):
        raise BadInputError(self.path, "not a .safetensors file or a model "
                            "directory")
      files = [self.path]
    self.shards: List[Tuple[str, SafetensorsFile]] = [
        (os.path.basename(f), SafetensorsFile(f)) for f in files]
    self._where: Dict[str, SafetensorsFile] = {}
    self.names: List[str] = []
    for _, sf in self.shards:
      for name in sf.names:
        if name in self._where:
          raise BadInputError(sf.path, "tensor appears in two shards",
                              tensor=name)
        self._where[name] = sf
        self.names.append(name)
    if self.sharded:
      self._check_index()

  def _dir_files(self) -> List[str]:
    indexes = sorted(glob.glob(os.path.join(self.path, "*" + INDEX_SUFFIX)))
    if "model" + INDEX_SUFFIX in map(os.path.basename, indexes):
      indexes = [os.path.join(self.path, "model" + INDEX_SUFFIX)]
    if len(indexes) == 1:
      return self._read_index(indexes[0])
    if len(indexes) > 1:
      raise BadInputError(self.path, "several *.safetensors.index.json "
                          "files; pass one model file instead")
    single = os.path.join(self.path, "model.safetensors")
    if os.path.isfile(single):
      return [single]
    found = sorted(glob.glob(os.path.join(self.path, "*.safetensors")))
    if len(found) == 1:
      return found
    if len(found) > 1:
      raise BadInputError(self.path, f"{len(found)} .safetensors files but "
                          "no model.safetensors.index.json")
    pickles = [f for f in sorted(os.listdir(self.path))
               if f.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
      _refuse_pickle(os.path.join(self.path, pickles[0]))
    raise BadInputError(self.path, "no .safetensors model in this directory")

  def _read_index(self, index_path) -> List[str]:
    self.sharded = True
    self.index_path = index_path
    try:
      with open(index_path) as f:
        index = json.load(f)
      weight_map = index["weight_map"]
      if not isinstance(weight_map, dict):
        raise ValueError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as e:
      raise BadInputError(index_path, f"corrupt index file ({e!r})")
    self.index_metadata = index.get("metadata") or {}
    self._weight_map = weight_map
    files = []
    for name, shard in weight_map.items():
      if not isinstance(shard, str) or not shard:
        raise BadInputError(index_path, f"corrupt index file: weight_map "
                            f"value {shard!r} is not a file name",
                            tensor=name)
      if shard not in files:
        full = os.path.join(os.path.dirname(index_path), shard)
        if shard.lower().endswith(PICKLE_SUFFIXES):
          _refuse_pickle(full)
        if not os.path.isfile(full):
          raise BadInputError(full, "shard listed in the index is missing",
                              tensor=name)
        files.append(shard)
    return [os.path.join(os.path.dirname(index_path), s) for s in sorted(files)]

  def _check_index(self):
    for name, shard in self._weight_map.items():
      sf = self._where.get(name)
      if sf is None or os.path.basename(sf.path) != shard:
        raise BadInputError(os.path.join(self.path, shard), "tensor listed in "
                            "the index is not in this shard", tensor=name)

  def info(self, name: str) -> TensorInfo:
    """Dtype, shape and location of tensor ``name``."""
    return self._where[name].tensors[name]

  def file_of(self, name: str) -> str:
    """The file holding tensor ``name``."""
    return self._where[name].path

  def read(self, name: str) -> np.ndarray:
    """Tensor ``name`` as a read-only memory-mapped numpy array."""
    return self._where[name].read(name)

  def read_bytes(self, name: str):
    """The raw bytes of tensor ``name``."""
    return self._where[name].read_bytes(name)

  def layout(self) -> List[Tuple[str, List[str]]]:
    """``[(shard file name, [tensor names in data order])]``."""
    return [(fname, list(sf.names)) for fname, sf in self.shards]

  @property
  def metadata(self) -> Dict[str, str]:
    """``__metadata__`` of the first shard."""
    return dict(self.shards[0][1].metadata)

  def identity(self) -> dict:
    """Content identity of all files (see :meth:`SafetensorsFile.identity`)."""
    return {fname: sf.identity() for fname, sf in self.shards}

  def describe(self, name: str) -> str:
    return self.file_of(name)


def _check_exists(path: str):
  """Bad input for a path that is missing, or a symlink loop (which
  ``os.path.exists`` reports as missing)."""
  try:
    os.stat(path)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise BadInputError(path, "symbolic link loop")
    raise BadInputError(path, "no such file or directory")


def files_of(model: ModelFiles) -> List[str]:
  """The real paths of a model's files."""
  return [os.path.realpath(sf.path) for _, sf in model.shards]


def check_distinct_paths(models: Sequence[ModelFiles]):
  """Bad input when two models are the same files (the same path twice, or
  a file given once as a file and once through its directory)."""
  seen = {}
  for m in models:
    key = tuple(files_of(m))
    if key in seen:
      raise BadInputError(m.path, f"is the same model as {seen[key].path} "
                          "(given twice: it adds no information)")
    seen[key] = m


def check_same_tensors(models: Sequence[ModelFiles]):
  """Raises :class:`BadInputError` unless all models have the same tensor
  names, shapes and dtypes (the first model is the reference)."""
  ref = models[0]
  ref_names = set(ref.names)
  for m in models[1:]:
    names = set(m.names)
    for name in ref.names:
      if name not in names:
        raise BadInputError(m.path, f"tensor missing (present in {ref.path})",
                            tensor=name)
    for name in m.names:
      if name not in ref_names:
        raise BadInputError(m.file_of(name), f"tensor not present in "
                            f"{ref.path}", tensor=name)
    for name in ref.names:
      a, b = ref.info(name), m.info(name)
      if a.shape != b.shape:
        raise BadInputError(b.file, f"shape {list(b.shape)} differs from "
                            f"{list(a.shape)} in {a.file}", tensor=name)
      if a.dtype != b.dtype:
        raise BadInputError(b.file, f"dtype {b.dtype} differs from {a.dtype} "
                            f"in {a.file}", tensor=name)


def output_layout(model: ModelFiles) -> Tuple[List[Tuple[str, List[str]]], bool]:
  """Output file names for a recovery of ``model``'s layout.

  Sharded inputs keep their shard names; a single file becomes
  ``model.safetensors``.

  Returns:
    ``([(file name, [tensor names])], sharded)``.
  """
  layout = model.layout()
  if model.sharded:
    return layout, True
  return [("model.safetensors", layout[0][1])], False


def write_index(out_dir, layout, specs: Dict[str, Tuple[str, tuple]],
                metadata: Optional[dict] = None):
  """Writes ``model.safetensors.index.json`` for ``layout`` atomically."""
  total = sum(int(np.prod(s, dtype=np.int64)) * DTYPES[d].itemsize
              for d, s in specs.values())
  meta = dict(metadata or {})
  meta["total_size"] = total
  index = {"metadata": meta,
           "weight_map": {n: f for f, names in layout for n in names}}
  from detune_jax.io.progress import write_json_atomic
  write_json_atomic(os.path.join(out_dir, "model" + INDEX_SUFFIX), index)


def write_model(out_dir, tensors: Dict[str, np.ndarray], shards: int = 1,
                metadata=None):
  """Writes ``{name: array}`` as an HF-style model directory.

  Args:
    out_dir: created if needed.
    tensors: name -> array (any dtype, incl. ``ml_dtypes.bfloat16``).
    shards: 1 for ``model.safetensors``, more for
      ``model-0000i-of-0000n.safetensors`` plus an index.
    metadata: ``__metadata__`` of each file (default ``{"format": "pt"}``).
  """
  from detune_jax.io.safetensors_io import dtype_name
  os.makedirs(out_dir, exist_ok=True)
  metadata = {"format": "pt"} if metadata is None else metadata
  names = list(tensors)
  if shards <= 1:
    layout = [("model.safetensors", names)]
  else:
    per = -(-len(names) // shards)
    layout = [(f"model-{i + 1:05d}-of-{shards:05d}.safetensors",
               names[i * per:(i + 1) * per]) for i in range(shards)]
  specs = {n: (dtype_name(np.asarray(a).dtype), np.shape(a))
           for n, a in tensors.items()}
  for fname, part in layout:
    w = SafetensorsWriter(os.path.join(out_dir, fname),
                          [(n,) + specs[n] for n in part], metadata)
    for n in part:
      w.write(n, tensors[n])
    w.commit()
  if shards > 1:
    write_index(out_dir, layout, specs)
