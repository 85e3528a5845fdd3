"""Layer stacks of fine-tuned models on disk, opened as recover opens them.

The audit, the benchmarks and the studies score a solver against a known
base: they need every fine-tuned layer of the models and of the base, as
``[L, n, d, k]`` stacks grouped by matrix shape. The models are read and
checked by the reader of ``python -m experiments.recover``
(:class:`detune_jax.io.ModelFiles` through :func:`detune_jax.pipeline.scan`:
single files or HF directories, sharded ones too; pickle checkpoints are
refused by name and never unpickled; bad input raises
:class:`detune_jax.io.BadInputError`).
"""

from __future__ import annotations

import glob
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from detune_jax import pipeline
from detune_jax.io.errors import BadInputError
from detune_jax.io.models import ModelFiles
from detune_jax.synthetic import release

__all__ = ["OpenedModels", "open_models", "layer_stacks", "folder_models",
           "folder_stack", "MINILM_DIR"]


class OpenedModels(NamedTuple):
  """Fine-tuned models opened and checked as recover opens them.

  Attributes:
    models: the fine-tunes (:class:`detune_jax.io.ModelFiles`).
    base: the base model, or None.
    names: the LoRA layers: float tensors of 2+ axes that differ among the
      models, in file order (conv kernels ``[o, i, kh, kw]`` and 3-D tensors
      included; they are solved as :func:`detune_jax.pipeline.matrix_shape`
      matrices).
  """
  models: List[ModelFiles]
  base: Optional[ModelFiles]
  names: List[str]


def open_models(models: Sequence[str], base: Optional[str] = None,
                rank: int = 1) -> OpenedModels:
  """Opens the models with recover's reader and checks, finds the LoRA layers.

  Uses :func:`detune_jax.pipeline.open_inputs` and
  :func:`detune_jax.pipeline.scan` with ``base`` as the ground truth, so
  that what recover refuses is refused here with the same one-line
  :class:`BadInputError`: fewer than 2 models, missing paths, pickle
  checkpoints (refused by name, never unpickled), truncated or corrupt
  files, tensor names / shapes / dtypes that differ among the models,
  non-finite values in a fine-tuned tensor (of the models or the base), a
  fine-tuned tensor missing from the base or shaped differently there, and
  ``rank`` too large for a layer. Sharded HF directories (with an index
  json) are read like single files. Also refused here: models with no LoRA
  layer at all.

  Args:
    models: paths of the fine-tunes (HF directories or .safetensors files).
    base: path of the base model, or None.
    rank: the LoRA rank that will be assumed for every layer.

  Returns:
    An :class:`OpenedModels`.

  Raises:
    BadInputError: see above.
  """
  config = pipeline.RecoverConfig(models=tuple(str(m) for m in models),
                                  ground_truth=None if base is None
                                  else str(base), rank=str(int(rank)))
  inputs = pipeline.open_inputs(config)
  plans = pipeline.scan(inputs, config)
  names = [p.name for p in plans if p.kind == "lora"]
  if not names:
    raise BadInputError(inputs.models[0].path, f"no fine-tuned layer: no "
                        f"float tensor of 2+ axes differs among the "
                        f"{len(inputs.models)} models")
  return OpenedModels(list(inputs.models), inputs.ground_truth, names)


def layer_stacks(base: str, models: Sequence[str], dtype: str = "float32",
                 rank: int = 1, rebase: bool = True
                 ) -> Dict[Tuple[int, int], Tuple[List[str], np.ndarray,
                                                  np.ndarray]]:
  """Fine-tuned layers of models on disk, grouped by matrix shape.

  The models and the base are opened and checked by :func:`open_models`
  (bad input raises :class:`BadInputError` naming the file and tensor).
  Tensors of more than 2 axes are reshaped to ``[d, prod(rest)]`` matrices,
  as recover solves them.

  Args:
    base: the ground-truth base model.
    models: the fine-tuned models.
    dtype: ``"stored"`` (the files' dtype), ``"float32"``, or a release
      dtype (``"bfloat16"``: base and fine-tunes rounded as a bf16 release,
      :func:`detune_jax.synthetic.release`).
    rank: the LoRA rank that will be assumed (a layer too small for it is
      bad input).
    rebase: for a release dtype, :func:`~detune_jax.synthetic.release`'s
      ``rebase``.

  Returns:
    ``{(d, k): (names, W_true [L, d, k], W_primes [L, n, d, k])}`` (numpy).
  """
  opened = open_models(models, base, rank)
  fts, true_model = opened.models, opened.base
  groups: Dict[Tuple[int, int], list] = {}
  for name in opened.names:
    groups.setdefault(pipeline.matrix_shape(fts[0].info(name).shape),
                      []).append(name)

  def read(model, name, shape):
    return np.array(model.read(name)).reshape(shape)

  out = {}
  for shape, group in groups.items():
    true = [read(true_model, nm, shape) for nm in group]
    ft = [np.stack([read(m, nm, shape) for m in fts]) for nm in group]
    if dtype == "stored":  # as the files hold them (e.g. a bf16 release)
      out[shape] = (group, np.stack(true), np.stack(ft))
      continue
    W, Wp = zip(*[release(t.astype(np.float32), p.astype(np.float32), dtype,
                          rebase) for t, p in zip(true, ft)])
    out[shape] = (group, np.stack(W), np.stack(Wp))
  return out


# Where the shipped MiniLM bench's rank-16 fine-tunes are merged, in the
# folder layout below, on first use.
MINILM_DIR = os.path.join("~", ".cache", "detune_jax", "minilm_bench_merged")


def folder_models(root: str, n: int) -> Tuple[str, List[str]]:
  """``(base, the first n fine-tunes)`` of a folder holding ``base/`` and
  fine-tunes ``ft*``, in name order. :data:`MINILM_DIR` is made from the
  shipped MiniLM bench (:func:`detune_jax.lora.bench.merged_folder`) as far
  as ``n`` needs.

  Raises:
    FileNotFoundError: fewer than ``n`` fine-tunes in ``root``.
  """
  root = os.path.expanduser(root)
  if os.path.abspath(root) == os.path.abspath(os.path.expanduser(MINILM_DIR)):
    from detune_jax.lora import bench  # pylint: disable=import-outside-toplevel
    bench.merged_folder(root, n)
  models = sorted(glob.glob(os.path.join(root, "ft*")))
  if len(models) < n:
    raise FileNotFoundError(
        f"{len(models)} fine-tunes ft* in {root}, need {n} (the default "
        f"{MINILM_DIR} is made from the shipped MiniLM bench)")
  return os.path.join(root, "base"), models[:n]


def folder_stack(root: str, n: int, dtype: str = "float32",
                 rebase: bool = True) -> Tuple[np.ndarray, np.ndarray]:
  """``(W_true [L, d, k], W_primes [L, n, d, k])``: every fine-tuned layer
  of the first ``n`` fine-tunes of :func:`folder_models` ``(root)``, all of
  one shape (as the attention layers of all-MiniLM-L6-v2 are), read by
  :func:`layer_stacks` (``dtype``, ``rebase``: its own).

  Raises:
    FileNotFoundError: see :func:`folder_models`.
    ValueError: the layers have more than one shape.
  """
  base, models = folder_models(root, n)
  groups = layer_stacks(base, models, dtype=dtype, rebase=rebase)
  if len(groups) != 1:
    raise ValueError(f"expected one layer shape, got {list(groups)}")
  (_, W, Wp), = groups.values()
  return W, Wp
