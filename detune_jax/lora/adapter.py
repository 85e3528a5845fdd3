"""LoRA adapters on HF-named weights: settings, initialisation, merging.

An adapter is a dict ``{hf_name: LoraFactors(a, b)}`` keyed by the full HF
tensor name of the weight it changes (``encoder.layer.0.attention.self.
query.weight``), with ``a [r, in]`` and ``b [out, r]`` in PEFT's layout; the
weight the model computes with is ``W + (alpha / r) b a`` in HF's ``[out, in]``
layout. ``a`` starts as PEFT's (kaiming-uniform with ``a = sqrt(5)``, i.e.
``U(-1/sqrt(in), 1/sqrt(in))``) and ``b`` at zero, so a new adapter leaves
the model exactly as it was.

>>> import jax
>>> settings = LoraSettings(rank=2, alpha=4.0, targets=(r"q\\.weight",))
>>> base = {"q.weight": np.ones((3, 5), np.float32),
...         "q.bias": np.zeros((3,), np.float32)}
>>> adapter = init_adapter(jax.random.key(0), base, settings)
>>> sorted(adapter), adapter["q.weight"].a.shape, adapter["q.weight"].b.shape
(['q.weight'], (2, 5), (3, 2))
>>> bool((merge(base, adapter, settings)["q.weight"] == 1).all())
True
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# Regular expressions (matched whole) over HF tensor names of BERT-family
# encoders: the four attention matrices of every layer, and the two MLP ones.
ATTENTION: Tuple[str, ...] = (
    r"(.*\.)?encoder\.layer\.\d+\.attention\.self\.(query|key|value)\.weight",
    r"(.*\.)?encoder\.layer\.\d+\.attention\.output\.dense\.weight",
)
MLP: Tuple[str, ...] = (
    r"(.*\.)?encoder\.layer\.\d+\.(intermediate|output)\.dense\.weight",
)


class LoraSettings(NamedTuple):
  """Static settings of a LoRA fine-tune (hashable: a ``jit`` static arg).

  Attributes:
    rank: LoRA rank ``r`` of every target without its own in
      ``rank_pattern``.
    alpha: LoRA alpha; each target is scaled by ``alpha / its rank``.
    targets: regular expressions matched against whole HF weight names;
      a 2-D weight matching any of them gets an adapter
      (``ATTENTION + MLP`` adds the MLP matrices).
    rank_pattern: ``((regex, rank), ...)``: the rank of targets whose name
      the regex matches whole (first match wins), as PEFT's ``rank_pattern``.
    learning_rate: AdamW learning rate.
    weight_decay: AdamW weight decay (on the adapter and the head).
    steps: optimiser steps.
    batch_size: examples per step, drawn with replacement.
    seed: seeds the adapter's ``a``, the head and the batches.
  """
  rank: int = 16
  alpha: float = 32.0
  targets: Tuple[str, ...] = ATTENTION
  rank_pattern: Tuple[Tuple[str, int], ...] = ()
  learning_rate: float = 1e-3
  weight_decay: float = 0.0
  steps: int = 120
  batch_size: int = 16
  seed: int = 0


class LoraFactors(NamedTuple):
  """One target's factors: ``a [r, in]``, ``b [out, r]`` (PEFT layout)."""
  a: jax.Array
  b: jax.Array


Adapter = Dict[str, LoraFactors]


def target_names(tensors: Mapping[str, np.ndarray] | Iterable[str],
                 settings: LoraSettings) -> List[str]:
  """The names of the 2-D weights ``settings.targets`` selects, sorted.

  Args:
    tensors: HF name -> array (or just the names, then no shape check).
    settings: the fine-tune's settings.

  Returns:
    Sorted HF names of the weights that get an adapter.

  Raises:
    ValueError: no weight matches, or a match is not a matrix.
  """
  patterns = [re.compile(t) for t in settings.targets]
  names = sorted(n for n in tensors if any(p.fullmatch(n) for p in patterns))
  if not names:
    raise ValueError(f"no weight matches the targets {settings.targets}")
  if isinstance(tensors, Mapping):
    for n in names:
      if np.ndim(tensors[n]) != 2:
        raise ValueError(f"target {n} has shape {np.shape(tensors[n])}; "
                         "LoRA targets must be matrices")
  return names


def rank_of(name: str, settings: LoraSettings) -> int:
  """The LoRA rank of target ``name``."""
  for pattern, rank in settings.rank_pattern:
    if re.fullmatch(pattern, name):
      return int(rank)
  return int(settings.rank)


def scale_of(name: str, settings: LoraSettings) -> float:
  """``alpha / r`` of target ``name`` (PEFT's scaling without rsLoRA)."""
  return float(settings.alpha) / rank_of(name, settings)


def init_adapter(key: jax.Array, tensors: Mapping[str, np.ndarray],
                 settings: LoraSettings) -> Adapter:
  """A new adapter: ``a`` as PEFT initialises it, ``b = 0``.

  Args:
    key: PRNG key; each target draws from its own fold of it.
    tensors: the base weights by HF name (only the targets' shapes are read).
    settings: ranks and targets.

  Returns:
    ``{hf_name: LoraFactors}`` in float32.
  """
  adapter = {}
  for i, name in enumerate(target_names(tensors, settings)):
    out, fan_in = np.shape(tensors[name])
    r = rank_of(name, settings)
    # kaiming_uniform_(a=sqrt(5)) bounds at sqrt(6 / (1 + 5) / fan_in).
    bound = 1.0 / np.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), (r, fan_in),
                           jnp.float32, -bound, bound)
    adapter[name] = LoraFactors(a, jnp.zeros((out, r), jnp.float32))
  return adapter


def apply_adapter(tensors: Mapping[str, jax.Array], adapter: Adapter,
                  settings: LoraSettings) -> Dict[str, jax.Array]:
  """The weights a model computes with: ``W + (alpha / r) b a`` on targets.

  Only the targeted matrices are new arrays; the others are the base's own,
  so inside ``jit`` this costs one ``[out, r] x [r, in]`` product per target.

  Args:
    tensors: base weights by HF name (jax or numpy arrays).
    adapter: the adapter.
    settings: alpha and ranks.

  Returns:
    ``tensors`` with the targets replaced (in their own dtype).
  """
  out = dict(tensors)
  for name, f in adapter.items():
    w = tensors[name]
    delta = scale_of(name, settings) * (f.b @ f.a)
    out[name] = (w.astype(jnp.float32) + delta).astype(w.dtype)
  return out


def merge(base_tensors: Mapping[str, np.ndarray], adapter: Adapter,
          settings: LoraSettings) -> Dict[str, np.ndarray]:
  """The merged model's tensors, as PEFT adapters are merged for release.

  Computed in float32 numpy as ``W + scale * (B @ A)`` and cast back to
  each base tensor's dtype, the same arithmetic as
  :func:`detune_jax.io.peft.adapter_deltas`, so the two agree bit for bit.

  Args:
    base_tensors: every tensor of the base by HF name.
    adapter: the adapter (one, not a stack).
    settings: alpha and ranks.

  Returns:
    Every tensor of the base, the targets merged.
  """
  out = dict(base_tensors)
  for name, f in adapter.items():
    w = np.asarray(base_tensors[name])
    a = np.asarray(f.a, np.float32)
    b = np.asarray(f.b, np.float32)
    delta = np.float32(scale_of(name, settings)) * (b @ a)
    out[name] = (w.astype(np.float32) + delta).astype(w.dtype)
  return out
