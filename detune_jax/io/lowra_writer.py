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

__all__ = ["factor_update", "write_lowra_bench"]

README = """---
configs:
- config_name: {subset}
  data_files:
  - split: train
    path: {subset}/train-*.parquet
---
LoRA fine-tunes in the LoWRA Bench layout, written by
experiments.lowra_export.
"""


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
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
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
           "pre_ft_name": name, "pre_ft_weight": W.tolist()}
    for i, (path, p) in enumerate(zip(models, primes)):
      B, A = factor_update(p - W, rank, max_dropped, f"{path}: {name}")
      row.update({f"lora_{i}_name": os.path.basename(os.path.normpath(path)),
                  f"lora_{i}_rank": rank, f"lora_{i}_alpha": float(rank),
                  f"lora_{i}_A_weight": A.tolist(),
                  f"lora_{i}_B_weight": B.tolist()})
    for c, v in row.items():
      cols.setdefault(c, []).append(v)
    layers += 1
  os.makedirs(os.path.join(out_dir, subset), exist_ok=True)
  pq.write_table(pa.table(cols), os.path.join(
      out_dir, subset, "train-00000-of-00001.parquet"), row_group_size=1)
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(README.format(subset=subset))
  return layers
