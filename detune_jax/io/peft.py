"""Merging a PEFT LoRA adapter into its base model (to build test sets).

An adapter directory holds ``adapter_config.json`` (``r``, ``lora_alpha``,
optional ``rank_pattern`` / ``alpha_pattern``, ``use_rslora``,
``fan_in_fan_out``) and ``adapter_model.safetensors`` with
``base_model.model.<module>.lora_A.weight`` ``[r, in(, kh, kw)]`` and
``...lora_B.weight`` ``[out, r(, 1, 1)]`` (embeddings:
``lora_embedding_A`` ``[r, vocab]`` / ``lora_embedding_B`` ``[dim, r]``).
The merged weight is ``W + scale * B @ A`` with ``scale = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA), computed in float32 and cast back to the
base dtype. Tensors saved whole (``modules_to_save``) replace the base ones.
DoRA adapters are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, List, Tuple

import numpy as np

from detune_jax.io.errors import BadInputError
from detune_jax.io.models import (ModelFiles, output_layout, write_index)
from detune_jax.io.safetensors_io import (DTYPES, SafetensorsFile,
                                          SafetensorsWriter)

_PREFIX = "base_model.model."
_LORA = re.compile(r"^(.*)\.(lora_A|lora_B|lora_embedding_A|"
                   r"lora_embedding_B)(\.[^.]+)?(\.weight)?$")


def _pattern_value(patterns: dict, module: str, default):
  for key, value in (patterns or {}).items():
    if module == key or module.endswith("." + key) or re.fullmatch(key, module):
      return value
  return default


def _resolve(module: str, base_names, what: str, adapter_file: str) -> str:
  """Base tensor name of adapter ``module`` (exact, else unique suffix)."""
  want = module + what
  if want in base_names:
    return want
  hits = [n for n in base_names
          if n.endswith("." + want) or want.endswith("." + n)]
  if len(hits) == 1:
    return hits[0]
  raise BadInputError(adapter_file, f"no unique base tensor for module "
                      f"{module!r} ({len(hits)} candidates)", tensor=want)


def load_adapter(adapter_dir) -> Tuple[dict, SafetensorsFile]:
  """Reads ``adapter_config.json`` and opens ``adapter_model.safetensors``."""
  adapter_dir = str(adapter_dir)
  cfg_path = os.path.join(adapter_dir, "adapter_config.json")
  st_path = os.path.join(adapter_dir, "adapter_model.safetensors")
  for p in ("adapter_model.bin", "adapter_model.pt"):
    if not os.path.exists(st_path) and os.path.exists(
        os.path.join(adapter_dir, p)):
      raise BadInputError(os.path.join(adapter_dir, p), "refusing a pickle "
                          "adapter; only adapter_model.safetensors is read")
  if not os.path.isfile(cfg_path):
    raise BadInputError(cfg_path, "no such file")
  try:
    with open(cfg_path) as f:
      cfg = json.load(f)
    int(cfg["r"])
  except (ValueError, KeyError, TypeError) as e:
    raise BadInputError(cfg_path, f"bad adapter config ({e!r})")
  if cfg.get("use_dora"):
    raise BadInputError(cfg_path, "DoRA adapters are not LoRA merges; "
                        "not supported")
  return cfg, SafetensorsFile(st_path)


def adapter_deltas(adapter_dir, base: ModelFiles) -> Dict[str, np.ndarray]:
  """What adapter ``adapter_dir`` does to the tensors of ``base``.

  Args:
    adapter_dir: PEFT adapter directory.
    base: the base model.

  Returns:
    ``{name: (kind, float32 array)}`` with kind ``"add"`` or ``"replace"``.
  """
  cfg, st = load_adapter(adapter_dir)
  base_names = set(base.names)
  pairs: Dict[str, Dict[str, np.ndarray]] = {}
  out = {}
  for key in st.names:
    short = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    if "lora_magnitude_vector" in short:
      raise BadInputError(st.path, "DoRA weights are not supported",
                          tensor=key)
    m = _LORA.match(short)
    if m:
      pairs.setdefault(m.group(1), {})[m.group(2)] = st.read(key)
    else:
      short = short.replace(".modules_to_save.default", "")
      name = _resolve(short, base_names, "", st.path)
      out[name] = ("replace", np.asarray(st.read(key), np.float32))
  for module, ab in sorted(pairs.items()):
    emb = "lora_embedding_A" in ab
    A = ab.get("lora_embedding_A" if emb else "lora_A")
    B = ab.get("lora_embedding_B" if emb else "lora_B")
    if A is None or B is None:
      raise BadInputError(st.path, "lora_A without lora_B (or the reverse)",
                          tensor=module)
    r = int(A.shape[0])
    r_cfg = int(_pattern_value(cfg.get("rank_pattern"), module, cfg["r"]))
    alpha = float(_pattern_value(cfg.get("alpha_pattern"), module,
                                 cfg.get("lora_alpha", r_cfg)))
    scale = alpha / (math.sqrt(r_cfg) if cfg.get("use_rslora") else r_cfg)
    A32, B32 = np.asarray(A, np.float32), np.asarray(B, np.float32)
    name = _resolve(module, base_names, ".weight", st.path)
    shape = base.info(name).shape
    if emb:
      delta = (B32 @ A32).T
    else:
      delta = B32.reshape(B32.shape[0], r) @ A32.reshape(r, -1)
      if cfg.get("fan_in_fan_out"):
        delta = delta.T
    if int(np.prod(delta.shape)) != int(np.prod(shape)):
      raise BadInputError(st.path, f"LoRA product {list(delta.shape)} does "
                          f"not fit base shape {list(shape)}", tensor=name)
    out[name] = ("add", (scale * delta).reshape(shape))
  return out


def merge_adapter(base_path, adapter_dir, out_dir) -> List[str]:
  """Writes ``base + adapter`` as a model directory shaped like the base.

  Args:
    base_path: base model (file or HF directory).
    adapter_dir: PEFT adapter directory.
    out_dir: output directory (created); sharded like the base.

  Returns:
    The names of the base tensors the adapter changed.
  """
  base = ModelFiles(base_path)
  deltas = adapter_deltas(adapter_dir, base)
  layout, sharded = output_layout(base)
  os.makedirs(out_dir, exist_ok=True)
  specs = {n: (base.info(n).dtype, base.info(n).shape) for n in base.names}
  for fname, names in layout:
    w = SafetensorsWriter(os.path.join(out_dir, fname),
                          [(n,) + specs[n] for n in names], base.metadata)
    try:
      for n in names:
        if n in deltas:
          kind, d = deltas[n]
          if kind == "replace":
            if d.shape != specs[n][1]:
              raise BadInputError(adapter_dir, f"saved module shape "
                                  f"{list(d.shape)} != base "
                                  f"{list(specs[n][1])}", tensor=n)
            w.write(n, d.astype(DTYPES[specs[n][0]]))
          else:
            merged = np.asarray(base.read(n), np.float32) + d
            w.write(n, merged.astype(DTYPES[specs[n][0]]))
        else:
          w.write_bytes(n, base.read_bytes(n))
    except BaseException:
      w.abort()
      raise
    w.commit()
  if sharded:
    write_index(out_dir, layout, specs, base.index_metadata)
  return sorted(deltas)
