"""Adapters written as PEFT adapter directories.

``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight``
``[r, in]`` and ``...lora_B.weight`` ``[out, r]`` in float32, ``<module>``
being the HF weight name without ``.weight``; ``adapter_config.json`` holds
PEFT's ``LoraConfig`` fields with the targets listed as full module names and
``rank_pattern`` for targets whose rank is not ``r``. Both
:func:`detune_jax.io.peft.merge_adapter` and ``peft.PeftModel.from_pretrained``
(on an HF model whose module names are the adapter's) read it.

>>> import os, tempfile, jax
>>> from detune_jax.lora.adapter import LoraSettings, init_adapter
>>> settings = LoraSettings(rank=2, targets=(r"q\\.weight",))
>>> adapter = init_adapter(jax.random.key(0),
...                        {"q.weight": np.zeros((3, 5), np.float32)}, settings)
>>> out = os.path.join(tempfile.mkdtemp(), "adapter")
>>> sorted(os.path.basename(f) for f in save_peft(adapter, settings, out))
['adapter_config.json', 'adapter_model.safetensors']
"""

from __future__ import annotations

import json
import os
from typing import List, Optional

import numpy as np

from detune_jax.io.safetensors_io import save_file
from detune_jax.lora.adapter import Adapter, LoraSettings, rank_of

PREFIX = "base_model.model."
FILES = ("adapter_model.safetensors", "adapter_config.json")


def module_name(weight_name: str) -> str:
  """The module PEFT wraps for weight ``weight_name`` (``.weight`` off)."""
  if not weight_name.endswith(".weight"):
    raise ValueError(f"{weight_name} is not a module's weight")
  return weight_name[:-len(".weight")]


def peft_tensors(adapter: Adapter) -> dict:
  """The adapter's tensors by PEFT's names (float32 numpy)."""
  out = {}
  for name, f in sorted(adapter.items()):
    module = PREFIX + module_name(name)
    out[module + ".lora_A.weight"] = np.asarray(f.a, np.float32)
    out[module + ".lora_B.weight"] = np.asarray(f.b, np.float32)
  return out


def peft_config(adapter: Adapter, settings: LoraSettings,
                base_name_or_path: Optional[str] = None) -> dict:
  """``adapter_config.json`` of the adapter, as PEFT's ``LoraConfig``."""
  modules = sorted(module_name(n) for n in adapter)
  ranks = {module_name(n): rank_of(n, settings) for n in adapter}
  return {
      "peft_type": "LORA",
      "task_type": None,
      "base_model_name_or_path": base_name_or_path,
      "revision": None,
      "inference_mode": True,
      "r": int(settings.rank),
      # An integral alpha is written as PEFT writes it, an int.
      "lora_alpha": (int(settings.alpha) if float(settings.alpha).is_integer()
                     else float(settings.alpha)),
      "lora_dropout": 0.0,
      "target_modules": modules,
      "rank_pattern": {m: r for m, r in sorted(ranks.items())
                       if r != settings.rank},
      "alpha_pattern": {},
      "fan_in_fan_out": False,
      "bias": "none",
      "use_rslora": False,
      "use_dora": False,
      "modules_to_save": None,
      "init_lora_weights": True,
      "layers_to_transform": None,
      "layers_pattern": None,
  }


def save_peft(adapter: Adapter, settings: LoraSettings, out_dir: str, *,
              base_name_or_path: Optional[str] = None) -> List[str]:
  """Writes ``adapter`` as a PEFT adapter directory.

  Each file is written beside its final name and renamed into place, the
  config last, so a directory with a config holds a complete adapter.

  Args:
    adapter: one adapter (not a stack).
    settings: its settings (rank, alpha, per-target ranks).
    out_dir: the directory (created); must not hold an adapter already.
    base_name_or_path: recorded as ``base_model_name_or_path``.

  Returns:
    The paths written.

  Raises:
    FileExistsError: ``out_dir`` already holds adapter files.
    ValueError: a factor of the adapter is stacked or mis-shaped.
  """
  for name, f in adapter.items():
    if np.ndim(f.a) != 2 or np.shape(f.b)[1] != np.shape(f.a)[0]:
      raise ValueError(f"{name}: factors {np.shape(f.a)} and {np.shape(f.b)} "
                       "are not one adapter's a [r, in] and b [out, r]")
    if np.shape(f.a)[0] != rank_of(name, settings):
      raise ValueError(f"{name}: rank {np.shape(f.a)[0]}, the settings say "
                       f"{rank_of(name, settings)}")
  paths = [os.path.join(out_dir, f) for f in FILES]
  held = [p for p in paths if os.path.exists(p)]
  if held:
    raise FileExistsError(f"{held[0]} exists; adapters are never overwritten")
  os.makedirs(out_dir, exist_ok=True)
  save_file(peft_tensors(adapter), paths[0], metadata={"format": "pt"})
  tmp = paths[1] + ".tmp"
  with open(tmp, "w") as f:
    json.dump(peft_config(adapter, settings, base_name_or_path), f, indent=2)
  os.replace(tmp, paths[1])
  return paths
