"""Merged LoRA fine-tunes of one base written in the LoWRA Bench layout.

LoWRA Bench (Horwitz et al. 2024) stores, per fine-tuned layer, the pre-FT
weight and every LoRA's factors ``A [r, k]``, ``B [d, r]``, rank and alpha
(:mod:`detune_jax.io.lowra` reads it); the official Spectral DeTuning script
reads that layout through HF ``datasets``. Writing it from merged fine-tunes
lets both run on the same real fine-tunes side by side.
"""

from __future__ import annotations

import os
from typing import Sequence, Tuple

import numpy as np

from detune_jax.io.models import ModelFiles

__all__ = ["factor_update", "write_lowra_bench", "write_lowra_adapters"]

README_HEAD = "---\nconfigs:\n"
README_CONFIG = """- config_name: {subset}
  data_files:
  - split: train
    path: {subset}/train-*.parquet
"""
README_TAIL = """---
LoRA fine-tunes in the LoWRA Bench layout, written by detune_jax
(experiments.lowra_export or experiments.make_minilm_bench).
"""
PARQUET = "train-00000-of-00001.parquet"


def factor_update(update: np.ndarray, rank: int, max_dropped: float,
                  where: str) -> Tuple[np.ndarray, np.ndarray]:
  """``(B [d, r], A [r, k])`` with ``B @ A`` the rank-``rank`` SVD of
  ``update`` (``B = U S``, ``A = V^T``).

  Raises:
    ValueError: the update has more than that rank: its singular value
      ``rank + 1`` is above ``max_dropped`` times the first (the message
      starts with ``where``).
  """
  U, s, Vt = np.linalg.svd(update.astype(np.float64), full_matrices=False)
  if s.size > rank and s[rank] > max_dropped * s[0]:
    raise ValueError(f"{where}: the update has rank above {rank} (singular "
                     f"value {rank + 1} is {s[rank] / s[0]:.2e} of the "
                     f"first)")
  B = (U[:, :rank] * s[:rank]).astype(np.float32)
  return B, Vt[:rank].astype(np.float32)


def write_lowra_bench(base: str, models: Sequence[str], rank: int,
                      out_dir: str, subset: str = "vit",
                      layer_model: str = "minilm",
                      max_dropped: float = 1e-4) -> int:
  """Writes the fine-tuned layers of ``models`` as a LoWRA Bench dataset.

  Each 2-D tensor of ``base`` that some model changes is a fine-tuned
  layer; model ``i``'s update ``W'_i - W`` is factored by
  :func:`factor_update` (``alpha = rank``). ``out_dir/README.md`` declares
  the subset for ``datasets.load_dataset`` (the official script accepts
  only its own subset names, hence the default ``vit`` whatever the model).

  Returns:
    The number of layers written.

  Raises:
    ValueError: an update of rank above ``rank`` (see :func:`factor_update`).
  """
  ref = ModelFiles(base)
  fts = [ModelFiles(m) for m in models]
  cols = {}
  layers = 0
  for name in ref.names:
    W = np.asarray(ref.read(name), np.float32)
    if W.ndim != 2:
      continue
    primes = [np.asarray(m.read(name), np.float32) for m in fts]
    if all(np.array_equal(p, W) for p in primes):
      continue
    row = {"layer_model": layer_model, "layer_name": name.rsplit(".", 1)[0],
           "pre_ft_name": name, "pre_ft_weight": W}
    for i, (path, p) in enumerate(zip(models, primes)):
      B, A = factor_update(p - W, rank, max_dropped, f"{path}: {name}")
      row.update({f"lora_{i}_name": os.path.basename(os.path.normpath(path)),
                  f"lora_{i}_rank": rank, f"lora_{i}_alpha": float(rank),
                  f"lora_{i}_A_weight": A, f"lora_{i}_B_weight": B})
    for c, v in row.items():
      cols.setdefault(c, []).append(v)
    layers += 1
  _write_subset(cols, out_dir, subset)
  return layers


def _matrix(x: np.ndarray):
  """A float32 matrix as an arrow ``list<list<float>>`` scalar's value."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  x = np.ascontiguousarray(x, np.float32)
  # Variable-size lists (as HF datasets writes them): layers of different
  # widths share one column.
  inner = pa.ListArray.from_arrays(
      pa.array(np.arange(0, x.size + 1, max(x.shape[1], 1),
                         dtype=np.int32)), pa.array(x.reshape(-1)))
  return pa.ListArray.from_arrays(pa.array([0, x.shape[0]], pa.int32()),
                                  inner)


def _write_subset(cols: dict, out_dir: str, subset: str):
  """Writes ``out_dir/subset/PARQUET`` (one row group per layer, through a
  temporary file) and a README declaring every subset in ``out_dir``."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  arrays = {}
  for c, v in cols.items():
    if v and isinstance(v[0], np.ndarray):
      arrays[c] = pa.concat_arrays([_matrix(x) for x in v])
    else:
      arrays[c] = pa.array(v)
  os.makedirs(os.path.join(out_dir, subset), exist_ok=True)
  path = os.path.join(out_dir, subset, PARQUET)
  pq.write_table(pa.table(arrays), path + ".tmp", row_group_size=1)
  os.replace(path + ".tmp", path)
  subsets = sorted(d for d in os.listdir(out_dir)
                   if os.path.exists(os.path.join(out_dir, d, PARQUET)))
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(README_HEAD + "".join(README_CONFIG.format(subset=d)
                                  for d in subsets) + README_TAIL)


def write_lowra_adapters(base: str, adapters: Sequence[str], out_dir: str,
                         subset: str, layer_model: str = "minilm") -> int:
  """Writes PEFT LoRA adapters of one base as a LoWRA Bench subset.

  Every layer some adapter targets is a row: the base's weight as
  ``pre_ft_weight`` and each adapter's own factors, rank and alpha
  (``alpha = scale * rank``, so the reader's ``alpha / rank * B @ A`` is
  the adapter's update), all float32. Every adapter must target the same
  layers.

  Returns:
    The number of layers written.

  Raises:
    BadInputError: an adapter :func:`detune_jax.io.peft.adapter_factors`
      refuses, or adapters that target different layers.
  """
  from detune_jax.io import peft  # pylint: disable=import-outside-toplevel
  from detune_jax.io.errors import BadInputError  # pylint: disable=import-outside-toplevel
  ref = ModelFiles(base)
  factors = [peft.adapter_factors(a, ref) for a in adapters]
  names = sorted(factors[0])
  for a, f in zip(adapters, factors):
    if sorted(f) != names:
      raise BadInputError(a, "targets other layers than "
                          f"{os.path.basename(os.path.normpath(adapters[0]))}"
                          " (a LoWRA Bench row holds every LoRA of a layer)")
  cols = {}
  for name in names:
    row = {"layer_model": layer_model, "layer_name": name.rsplit(".", 1)[0],
           "pre_ft_name": name,
           "pre_ft_weight": np.asarray(ref.read(name), np.float32)}
    for i, (path, fs) in enumerate(zip(adapters, factors)):
      f = fs[name]
      row.update({f"lora_{i}_name": os.path.basename(os.path.normpath(path)),
                  f"lora_{i}_rank": int(f.rank),
                  f"lora_{i}_alpha": float(f.scale * f.rank),
                  f"lora_{i}_A_weight": f.A, f"lora_{i}_B_weight": f.B})
    for c, v in row.items():
      cols.setdefault(c, []).append(v)
  _write_subset(cols, out_dir, subset)
  return len(names)
