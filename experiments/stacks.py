"""Layer stacks for the few-fine-tunes experiments (frontier, audit).

Synthetic LoRA stacks (Gaussian, or with factors that share directions) and
real ones read from HF model directories (``model.safetensors``, read with
safetensors only: nothing is unpickled).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

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


def release(W, W_primes, dtype: str):
  """Casts a float32 base and fine-tunes to a release dtype.

  The base of a low-precision release is itself on that dtype's grid, and
  the fine-tunes are ``round(W + M_i)`` with ``M_i = W'_i - W`` from float32.
  """
  W = np.asarray(W, np.float32)
  W_primes = np.asarray(W_primes, np.float32)
  if dtype == "float32":
    return W, W_primes
  dt = NP_DTYPES[dtype]
  M = W_primes - W[None]
  W_low = W.astype(dt)
  W_primes_low = (W_low.astype(np.float32)[None] + M).astype(dt)
  return W_low, W_primes_low


def _model_file(path: str) -> str:
  if os.path.isdir(path):
    path = os.path.join(path, "model.safetensors")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no model.safetensors at {path}")
  return path


def load_tensors(path: str, names: Optional[Sequence[str]] = None):
  """``{name: np.ndarray}`` from a safetensors model (dir or file)."""
  out = {}
  with safe_open(_model_file(path), "np") as f:
    for name in (names if names is not None else f.keys()):
      out[name] = f.get_tensor(name)
  return out


def finetuned_names(paths: Sequence[str]) -> List[str]:
  """2-D tensors that are not bit-identical in all the given models."""
  files = [safe_open(_model_file(p), "np") for p in paths]
  names = []
  for name in files[0].keys():
    if len(files[0].get_slice(name).get_shape()) != 2:
      continue
    first = files[0].get_tensor(name)
    if any(not np.array_equal(first.view(np.uint8), f.get_tensor(name).view(
        np.uint8)) for f in files[1:]):
      names.append(name)
  return names


def real_stacks(base: str, models: Sequence[str],
                names: Optional[Sequence[str]] = None,
                dtype: str = "float32"):
  """Fine-tuned layers of real models, grouped by shape.

  Args:
    base: the ground-truth base model.
    models: the fine-tuned models.
    names: tensors to use (default: those that differ among ``models``).
    dtype: ``"stored"`` (the files' dtype), ``"float32"``, or a release
      dtype (``"bfloat16"``: base and fine-tunes rounded as a bf16 release).

  Returns:
    ``{shape: (names, W_true [L, d, k], W_primes [L, n, d, k])}``.
  """
  if names is None:
    names = finetuned_names(list(models))
  true = load_tensors(base, names)
  fts = [load_tensors(m, names) for m in models]
  groups: Dict[Tuple[int, int], list] = {}
  for name in names:
    groups.setdefault(tuple(true[name].shape), []).append(name)
  out = {}
  for shape, group in groups.items():
    if dtype == "stored":  # as the files hold them (e.g. a bf16 release)
      out[shape] = (group, np.stack([true[nm] for nm in group]),
                    np.stack([np.stack([ft[nm] for ft in fts])
                              for nm in group]))
      continue
    W = np.stack([true[nm].astype(np.float32) for nm in group])
    Wp = np.stack([np.stack([ft[nm].astype(np.float32) for ft in fts])
                   for nm in group])
    W, Wp = zip(*[release(W[l], Wp[l], dtype) for l in range(len(group))])
    out[shape] = (group, np.stack(W), np.stack(Wp))
  return out
