"""LoWRA Bench (Horwitz et al. 2024, App. D) from its parquet files.

One row per fine-tuned layer with columns ``layer_model``, ``layer_name``,
``pre_ft_name``, ``pre_ft_weight`` and, per LoRA ``i``, ``lora_{i}_name``,
``lora_{i}_rank``, ``lora_{i}_alpha``, ``lora_{i}_A_weight`` ``[r, k]`` and
``lora_{i}_B_weight`` ``[d, r]``. LoRA ``i``'s fine-tuned layer is
``W_pre + alpha / rank * B @ A`` (as in the benchmark's own code); the pre-FT
weight is used only as ground truth.

Weights are nested lists (``list<list<float>>``, as written by HF datasets);
rows are read one row group at a time, only the columns needed.
"""

from __future__ import annotations

import glob
import hashlib
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from detune_jax.io.errors import BadInputError
from detune_jax.io.safetensors_io import TensorInfo


def find_parquet_files(path, subset: Optional[str] = None) -> List[str]:
  """Parquet files of ``subset`` under ``path`` (a file or a directory).

  A file belongs to the subset when a directory on its path, or the start of
  its name, is the subset name (``vit/train-0000.parquet``,
  ``data/vit-00000-of-00002.parquet``).
  """
  path = str(path)
  if not os.path.exists(path):
    raise BadInputError(path, "no such file or directory")
  if os.path.isfile(path):
    return [path]
  files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"),
                           recursive=True))
  if subset:
    def belongs(f):
      parts = os.path.relpath(f, path).split(os.sep)
      return subset in parts[:-1] or parts[-1].startswith(subset)
    files = [f for f in files if belongs(f)]
  if not files:
    raise BadInputError(path, "no parquet files" +
                        (f" for subset {subset!r}" if subset else ""))
  return files


def _nested_to_numpy(arr) -> np.ndarray:
  """A length-1 arrow array of (nested) lists of numbers -> ndarray."""
  import pyarrow as pa
  import pyarrow.compute as pc
  shape, a = [], arr
  while (pa.types.is_list(a.type) or pa.types.is_large_list(a.type) or
         pa.types.is_fixed_size_list(a.type)):
    if a.null_count:
      raise ValueError("null entries")
    if pa.types.is_fixed_size_list(a.type):
      n = a.type.list_size
    else:
      lens = np.unique(pc.list_value_length(a).to_numpy(zero_copy_only=False))
      if lens.size > 1:
        raise ValueError("ragged nested lists")
      n = int(lens[0]) if lens.size else 0
    shape.append(n)
    a = a.flatten()
  if not (pa.types.is_floating(a.type) or pa.types.is_integer(a.type)):
    raise ValueError(f"values of type {a.type} (expected numbers)")
  return np.asarray(a.to_numpy(zero_copy_only=False)).reshape(shape)


class LowraBench:
  """The LoRAs ``lora_ids`` of one LoWRA Bench subset as n virtual models.

  Args:
    path: parquet file or directory (a local copy of the dataset).
    subset: e.g. ``"vit"``; selects files under ``path``.
    lora_ids: which LoRA columns to use (default ``range(n_loras)``).
    n_loras: how many LoRAs when ``lora_ids`` is not given.

  Attributes:
    models: n objects with the interface of
      :class:`detune_jax.io.models.ModelFiles` (names, info, read, ...).
    ground_truth: the same for the pre-FT weights.
  """

  def __init__(self, path, subset: Optional[str] = None,
               lora_ids: Optional[Sequence[int]] = None, n_loras: int = 5):
    import pyarrow.parquet as pq
    self.path = str(path)
    self.subset = subset
    self.files = find_parquet_files(path, subset)
    self.lora_ids = (list(range(n_loras)) if not lora_ids
                     else [int(i) for i in lora_ids])
    self.rows: List[Tuple[str, int, int]] = []   # (file, row group, row)
    meta_cols = ["layer_model", "layer_name", "pre_ft_name"]
    lora_meta = [f"lora_{i}_{c}" for i in self.lora_ids
                 for c in ("rank", "alpha")]
    self._weight_cols = ["pre_ft_weight"] + [
        f"lora_{i}_{c}_weight" for i in self.lora_ids for c in ("A", "B")]
    names, self.lora_ranks, self.lora_alphas = [], [], []
    self.layer_models = []
    for f in self.files:
      try:
        pf = pq.ParquetFile(f)
      except Exception as e:  # pyarrow raises several types on bad files.
        raise BadInputError(f, f"not a readable parquet file ({e})")
      cols = set(pf.schema_arrow.names)
      for c in meta_cols + lora_meta + self._weight_cols:
        if c not in cols:
          raise BadInputError(f, f"column {c!r} missing (not a LoWRA Bench "
                              f"file, or fewer LoRAs than requested)")
      for rg in range(pf.num_row_groups):
        t = pf.read_row_group(rg, columns=meta_cols + lora_meta).to_pydict()
        for j in range(len(t["pre_ft_name"])):
          self.rows.append((f, rg, j))
          names.append((t["layer_model"][j], t["pre_ft_name"][j] or
                        t["layer_name"][j]))
          self.lora_ranks.append([int(t[f"lora_{i}_rank"][j])
                                  for i in self.lora_ids])
          self.lora_alphas.append([float(t[f"lora_{i}_alpha"][j])
                                   for i in self.lora_ids])
    if not self.rows:
      raise BadInputError(self.path, "no rows")
    plain = [n for _, n in names]
    if len(set(plain)) == len(plain):
      self.names = plain
    else:
      self.names = [f"{m}/{n}" for m, n in names]
      if len(set(self.names)) != len(self.names):
        self.names = [f"{k:05d}/{n}" for k, n in enumerate(self.names)]
    self._row_of = {n: k for k, n in enumerate(self.names)}
    self._cache_key, self._cache = None, None
    self._shapes: Dict[str, tuple] = {}
    self.models = [_LowraModel(self, k) for k in range(len(self.lora_ids))]
    self.ground_truth = _LowraModel(self, None)

  def _row(self, name) -> Dict[str, np.ndarray]:
    import pyarrow.parquet as pq
    k = self._row_of[name]
    if self._cache_key != k:
      f, rg, j = self.rows[k]
      t = pq.ParquetFile(f).read_row_group(rg, columns=self._weight_cols)
      t = t.slice(j, 1)
      row = {}
      for c in self._weight_cols:
        try:
          row[c] = _nested_to_numpy(t.column(c).combine_chunks())
        except ValueError as e:
          raise BadInputError(f, f"column {c}: {e}", tensor=name)
      self._cache_key, self._cache = k, row
    return self._cache

  def shape(self, name) -> tuple:
    """Shape of layer ``name`` (reads its row the first time)."""
    if name not in self._shapes:
      self._shapes[name] = tuple(self._row(name)["pre_ft_weight"].shape)
    return self._shapes[name]

  def merged(self, name, k: Optional[int]) -> np.ndarray:
    """``W_pre + alpha / rank * B @ A`` of LoRA ``k`` (float32); the pre-FT
    weight for ``k=None``."""
    row = self._row(name)
    W = row["pre_ft_weight"].astype(np.float32)
    if k is None:
      return W
    i = self.lora_ids[k]
    r = self._row_of[name]
    A = row[f"lora_{i}_A_weight"].astype(np.float32)
    B = row[f"lora_{i}_B_weight"].astype(np.float32)
    scale = np.float32(self.lora_alphas[r][k] / self.lora_ranks[r][k])
    if B.ndim != 2 or A.ndim != 2 or (B.shape[0], A.shape[1]) != W.shape or \
        B.shape[1] != A.shape[0]:
      raise BadInputError(self.rows[r][0], f"LoRA {i}: B {list(B.shape)} @ A "
                          f"{list(A.shape)} does not match the pre-FT weight "
                          f"{list(W.shape)}", tensor=name)
    return W + (scale * B) @ A

  def identity(self) -> dict:
    ident = {"subset": self.subset, "lora_ids": self.lora_ids, "files": {}}
    for f in self.files:
      h = hashlib.sha256()
      size = os.path.getsize(f)
      with open(f, "rb") as fh:
        for i in range(16):
          fh.seek(size * i // 16)
          h.update(fh.read(4096))
      ident["files"][os.path.basename(f)] = {"path": os.path.realpath(f),
                                             "size": size,
                                             "sample": h.hexdigest()}
    return ident


class _LowraModel:
  """One LoRA of a :class:`LowraBench` (or its pre-FT model) as a model."""

  def __init__(self, bench: LowraBench, k: Optional[int]):
    self.bench, self.k = bench, k
    label = "pre_ft" if k is None else f"lora_{bench.lora_ids[k]}"
    self.path = f"{bench.path}[{bench.subset or '*'}:{label}]"
    self.names = list(bench.names)
    self.sharded = False
    self.metadata = {"format": "pt"}

  def info(self, name) -> TensorInfo:
    shape = self.bench.shape(name)
    return TensorInfo(name, "F32", shape, self.file_of(name), 0,
                      4 * int(np.prod(shape)))

  def file_of(self, name) -> str:
    return self.bench.rows[self.bench._row_of[name]][0]

  def read(self, name) -> np.ndarray:
    return self.bench.merged(name, self.k)

  def read_bytes(self, name):
    return memoryview(np.ascontiguousarray(self.read(name)).view(np.uint8)
                      .reshape(-1))

  def layout(self):
    return [("model.safetensors", list(self.names))]

  def identity(self) -> dict:
    return {"lowra": self.bench.identity(), "lora": self.k}
