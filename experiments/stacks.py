"""Layer stacks for the few-fine-tunes experiments (frontier, audit).

Synthetic LoRA stacks (Gaussian, or with factors that share directions) and
real ones read from models on disk with the reader and checks of
``experiments.recover`` (:class:`detune_jax.io.ModelFiles`: single files or
HF directories, sharded ones too; pickle checkpoints are refused by name and
never unpickled; bad input raises :class:`detune_jax.io.BadInputError`).
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from detune_jax import pipeline
from detune_jax.io.errors import BadInputError
from detune_jax.io.models import ModelFiles

NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16,
             "float16": np.float16}


def synthetic_stack(seed: int, d: int, k: int, n: int, rank: int, *,
                    shared: float = 0.0, scale: float = 0.02,
                    dtype: str = "float32"):
  """A base ``W`` and ``n`` merged LoRA fine-tunes ``W + B_i A_i``.

  Args:
    seed: PRNG seed.
    d, k, n, rank: layer shape, number of fine-tunes, LoRA rank.
    shared: in ``[0, 1)``: each factor is ``sqrt(shared) * common +
      sqrt(1 - shared) * own`` (correlated fine-tunes: the LoRAs' column and
      row spaces share directions, as fine-tunes on similar data do).
    scale: standard deviation of the entries of ``W``, ``B_i`` and ``A_i``.
    dtype: release dtype (``"bfloat16"``: the base is on the bf16 grid too
      and the merge is rounded to bf16).

  Returns:
    ``(W [d, k], W_primes [n, d, k])`` as numpy arrays of ``dtype``.
  """
  kw, kb, ka, kcb, kca = jax.random.split(jax.random.key(seed), 5)
  W = np.asarray(jax.random.normal(kw, (d, k))) * scale
  B = np.asarray(jax.random.normal(kb, (n, d, rank)))
  A = np.asarray(jax.random.normal(ka, (n, rank, k)))
  if shared:
    B = np.sqrt(shared) * np.asarray(jax.random.normal(kcb, (1, d, rank))) + \
        np.sqrt(1 - shared) * B
    A = np.sqrt(shared) * np.asarray(jax.random.normal(kca, (1, rank, k))) + \
        np.sqrt(1 - shared) * A
  M = (B * scale) @ (A * scale)
  return release(W.astype(np.float32), (W[None] + M).astype(np.float32), dtype)


def release(W, W_primes, dtype: str, rebase: bool = True):
  """Casts a float32 base and fine-tunes to a release dtype.

  With ``rebase`` (fine-tunes made from the base as released): the base of
  a low-precision release is itself on that dtype's grid, and the
  fine-tunes are ``round(W + M_i)`` with ``M_i = W'_i - W`` from float32.
  Without: each is rounded on its own (``round(W)``, ``round(W'_i)``), as
  saving float32 fine-tunes of a float32 base in that dtype does.
  """
  W = np.asarray(W, np.float32)
  W_primes = np.asarray(W_primes, np.float32)
  if dtype == "float32":
    return W, W_primes
  dt = NP_DTYPES[dtype]
  if not rebase:
    return W.astype(dt), W_primes.astype(dt)
  M = W_primes - W[None]
  W_low = W.astype(dt)
  W_primes_low = (W_low.astype(np.float32)[None] + M).astype(dt)
  return W_low, W_primes_low


class RealModels(NamedTuple):
  """Fine-tuned models opened and checked as ``experiments.recover`` does.

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
                rank: int = 1) -> RealModels:
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
    A :class:`RealModels`.

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
  return RealModels(list(inputs.models), inputs.ground_truth, names)


def real_stacks(base: str, models: Sequence[str], dtype: str = "float32",
                rank: int = 1, rebase: bool = True):
  """Fine-tuned layers of real models, grouped by matrix shape.

  The models and the base are opened and checked by :func:`open_models`
  (bad input raises :class:`BadInputError` naming the file and tensor).
  Tensors of more than 2 axes are reshaped to ``[d, prod(rest)]`` matrices,
  as recover solves them.

  Args:
    base: the ground-truth base model.
    models: the fine-tuned models.
    dtype: ``"stored"`` (the files' dtype), ``"float32"``, or a release
      dtype (``"bfloat16"``: base and fine-tunes rounded as a bf16 release).
    rank: the LoRA rank that will be assumed (a layer too small for it is
      bad input).
    rebase: for a release dtype, :func:`release`'s ``rebase``.

  Returns:
    ``{(d, k): (names, W_true [L, d, k], W_primes [L, n, d, k])}``.
  """
  # The LoRA layers, each in every model and in the base (scan checks it).
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
