r"""Writes LoRA fine-tunes of one base model as a LoWRA Bench-layout dataset.

LoWRA Bench (Horwitz et al. 2024) stores, per fine-tuned layer, the pre-FT
weight and every LoRA's factors ``A [r, k]``, ``B [d, r]``, rank and alpha;
the official Spectral DeTuning script reads that layout (through HF
``datasets``), as does ``experiments.recover --lowra_bench``. This writes the
same layout from merged fine-tunes (e.g. ``experiments.build_minilm_finetunes``)
so that both can run on real fine-tunes side by side:

  python -m experiments.lowra_export --base=BASE --models=FT0,FT1,... \
      --rank=16 --output_dir=OUT

Each fine-tuned layer's update ``W'_i - W`` is factored by its SVD at
``--rank`` (``B = U S``, ``A = V^T``, ``alpha = rank``); the update must have
at most that rank (the largest dropped singular value is checked against
``--max_dropped``, relative to the first). ``OUT/README.md`` declares the
subset (``--subset``; the official script accepts only its own subset names,
so the default is ``vit`` whatever the model) for ``datasets.load_dataset``.
"""

import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import app, flags

from detune_jax.io.models import ModelFiles

FLAGS = flags.FLAGS

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


def factor(update: np.ndarray, rank: int, max_dropped: float, where: str):
  """``(B [d, r], A [r, k])`` with ``B @ A`` the rank-``rank`` SVD of
  ``update``; exits if the update has more than that rank."""
  U, s, Vt = np.linalg.svd(update.astype(np.float64), full_matrices=False)
  if s.size > rank and s[rank] > max_dropped * s[0]:
    sys.exit(f"{where}: the update has rank above {rank} (singular value "
             f"{rank + 1} is {s[rank] / s[0]:.2e} of the first)")
  B = (U[:, :rank] * s[:rank]).astype(np.float32)
  return B, Vt[:rank].astype(np.float32)


def export(base: str, models, rank: int, out_dir: str, subset: str = "vit",
           layer_model: str = "minilm", max_dropped: float = 1e-4) -> int:
  """Writes the dataset; returns the number of layers."""
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
      B, A = factor(p - W, rank, max_dropped, f"{path}: {name}")
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


def main(argv):
  del argv
  n = export(FLAGS.base, FLAGS.models, FLAGS.rank, FLAGS.output_dir,
             FLAGS.subset, FLAGS.layer_model, FLAGS.max_dropped)
  print(f"{n} layers x {len(FLAGS.models)} LoRAs -> {FLAGS.output_dir}")


def _define_flags():
  # Defined only when run as a binary: the benchmark imports export().
  flags.DEFINE_string("base", None, "The base model (file or HF directory).")
  flags.DEFINE_list("models", [], "The fine-tuned models.")
  flags.DEFINE_integer("rank", 16, "LoRA rank of every fine-tune.")
  flags.DEFINE_string("output_dir", None, "Where the dataset goes.")
  flags.DEFINE_string("subset", "vit", "Subset (config) name.")
  flags.DEFINE_string("layer_model", "minilm", "The layer_model column.")
  flags.DEFINE_float("max_dropped", 1e-4, "Largest singular value allowed "
                     "past the rank, relative to the first.")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["base", "output_dir"])
  app.run(main)
