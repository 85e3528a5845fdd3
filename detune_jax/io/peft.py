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
DoRA adapters are refused. :func:`merge_adapter` never overwrites files
and never leaves a half-written output.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from typing import Dict, List, NamedTuple, Tuple

import numpy as np

from detune_jax.io.errors import BadInputError
from detune_jax.io.models import (INDEX_SUFFIX, ModelFiles, output_layout,
                                  write_index)
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


class Factors(NamedTuple):
  """One LoRA target of an adapter: ``A`` and ``B`` as stored (float32),
  its rank ``r`` and ``scale`` (``alpha / r``, ``alpha / sqrt(r)`` with
  rsLoRA), and whether it is an embedding's (``lora_embedding_A/B``)."""
  A: np.ndarray
  B: np.ndarray
  rank: int
  scale: float
  embedding: bool


def _read_adapter(adapter_dir, base: ModelFiles):
  """``(cfg, replaced, factors)``: the whole tensors of ``modules_to_save``
  and the LoRA factors of every target, keyed by base tensor name."""
  cfg, st = load_adapter(adapter_dir)
  base_names = set(base.names)
  pairs: Dict[str, Dict[str, np.ndarray]] = {}
  replaced = {}
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
      replaced[name] = np.asarray(st.read(key), np.float32)
  factors = {}
  for module, ab in sorted(pairs.items()):
    emb = "lora_embedding_A" in ab
    A = ab.get("lora_embedding_A" if emb else "lora_A")
    B = ab.get("lora_embedding_B" if emb else "lora_B")
    if A is None or B is None:
      raise BadInputError(st.path, "lora_A without lora_B (or the reverse)",
                          tensor=module)
    r_cfg = int(_pattern_value(cfg.get("rank_pattern"), module, cfg["r"]))
    alpha = float(_pattern_value(cfg.get("alpha_pattern"), module,
                                 cfg.get("lora_alpha", r_cfg)))
    scale = alpha / (math.sqrt(r_cfg) if cfg.get("use_rslora") else r_cfg)
    name = _resolve(module, base_names, ".weight", st.path)
    factors[name] = Factors(np.asarray(A, np.float32),
                            np.asarray(B, np.float32), r_cfg, scale, emb)
  return cfg, st, replaced, factors


def adapter_deltas(adapter_dir, base: ModelFiles) -> Dict[str, np.ndarray]:
  """What adapter ``adapter_dir`` does to the tensors of ``base``.

  Args:
    adapter_dir: PEFT adapter directory.
    base: the base model.

  Returns:
    ``{name: (kind, float32 array)}`` with kind ``"add"`` or ``"replace"``.
  """
  cfg, st, replaced, factors = _read_adapter(adapter_dir, base)
  out = {name: ("replace", t) for name, t in replaced.items()}
  for name, f in factors.items():
    r = int(f.A.shape[0])
    shape = base.info(name).shape
    if f.embedding:
      delta = (f.B @ f.A).T
    else:
      delta = f.B.reshape(f.B.shape[0], r) @ f.A.reshape(r, -1)
      if cfg.get("fan_in_fan_out"):
        delta = delta.T
    if int(np.prod(delta.shape)) != int(np.prod(shape)):
      raise BadInputError(st.path, f"LoRA product {list(delta.shape)} does "
                          f"not fit base shape {list(shape)}", tensor=name)
    out[name] = ("add", (f.scale * delta).reshape(shape))
  return out


def adapter_factors(adapter_dir, base: ModelFiles) -> Dict[str, Factors]:
  """The LoRA factors of an adapter of plain linear layers, keyed by base
  tensor name, with ``B [out, r] @ A [r, in]`` in the base's layout.

  Raises:
    BadInputError: the adapter has what factors alone do not describe
      (``modules_to_save``, embeddings, convolutions, ``fan_in_fan_out``),
      or factors that do not fit their base tensor.
  """
  cfg, st, replaced, factors = _read_adapter(adapter_dir, base)
  if replaced:
    raise BadInputError(st.path, "whole tensors (modules_to_save) are not "
                        "LoRA factors", tensor=sorted(replaced)[0])
  if cfg.get("fan_in_fan_out"):
    raise BadInputError(os.path.join(str(adapter_dir), "adapter_config.json"),
                        "fan_in_fan_out adapters are not supported here")
  for name, f in factors.items():
    shape = tuple(base.info(name).shape)
    if f.embedding or f.A.ndim != 2 or f.B.ndim != 2 or \
        (f.B.shape[0], f.A.shape[1]) != shape or f.B.shape[1] != f.A.shape[0]:
      raise BadInputError(st.path, f"B {list(f.B.shape)} @ A "
                          f"{list(f.A.shape)} is not a linear layer's update "
                          f"of shape {list(shape)}", tensor=name)
  return factors


def _first_missing_dir(path: str):
  """The outermost ancestor of ``path`` (or ``path``) that does not exist."""
  missing = None
  while not os.path.exists(path):
    missing, parent = path, os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return missing


def check_output_dir(out_dir, base: ModelFiles) -> None:
  """Refuses an output directory that merging could overwrite.

  Raises:
    BadInputError: ``out_dir`` is an existing file, the base model's own
      directory, or a directory that already holds model files
      (``*.safetensors`` or ``*.safetensors.index.json``).
  """
  out = str(out_dir)
  if os.path.exists(out) and not os.path.isdir(out):
    raise BadInputError(out, "output path exists and is not a directory")
  base_dir = base.path if os.path.isdir(base.path) else os.path.dirname(
      os.path.abspath(base.path))
  if os.path.realpath(out) == os.path.realpath(base_dir):
    raise BadInputError(out, "is the base model's own directory; merging "
                        "never overwrites files: give a new --output_dir")
  if os.path.isdir(out):
    held = sorted(f for f in os.listdir(out) if f.endswith(".safetensors")
                  or f.endswith(INDEX_SUFFIX))
    if held:
      raise BadInputError(out, f"output directory already holds model files "
                          f"({', '.join(held[:3])}); merging never "
                          f"overwrites files: give a new --output_dir")


def merge_adapter(base_path, adapter_dir, out_dir) -> List[str]:
  """Writes ``base + adapter`` as a model directory shaped like the base.

  Nothing is ever overwritten, and nothing is left half-written: the files
  are written into a temporary directory, then moved into ``out_dir``
  (renamed to it when it is new) once all are complete.

  Args:
    base_path: base model (file or HF directory).
    adapter_dir: PEFT adapter directory.
    out_dir: output directory (created); sharded like the base. It may exist
      (e.g. holding a config) but must hold no model files, and must not be
      the base's own directory.

  Returns:
    The names of the base tensors the adapter changed.

  Raises:
    BadInputError: bad base or adapter, an output directory that merging
      would overwrite (see :func:`check_output_dir`), or one that cannot be
      written.
  """
  base = ModelFiles(base_path)
  check_output_dir(out_dir, base)
  deltas = adapter_deltas(adapter_dir, base)
  layout, sharded = output_layout(base)
  specs = {n: (base.info(n).dtype, base.info(n).shape) for n in base.names}
  out = os.path.abspath(str(out_dir))
  exists = os.path.isdir(out)
  created = None if exists else _first_missing_dir(out)
  tmp = None
  try:
    if exists:  # write beside the user's files, then move in
      tmp = tempfile.mkdtemp(prefix=".merge_peft.tmp-", dir=out)
    else:  # write a sibling directory, then rename it to out_dir
      os.makedirs(os.path.dirname(out), exist_ok=True)
      tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-",
                             dir=os.path.dirname(out))
    _write_merged(tmp, base, deltas, layout, specs, adapter_dir)
    files = [fname for fname, _ in layout]
    if sharded:
      write_index(tmp, layout, specs, base.index_metadata)
      files.append("model" + INDEX_SUFFIX)  # moved last
    if exists:
      for f in files:
        if os.path.exists(os.path.join(out, f)):
          raise BadInputError(os.path.join(out, f), "appeared while merging; "
                              "not overwritten")
      for f in files:
        os.replace(os.path.join(tmp, f), os.path.join(out, f))
      os.rmdir(tmp)
    else:
      os.rename(tmp, out)
  except BaseException as e:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
    if created is not None and created != out:  # parents made here, if empty
      d = os.path.dirname(out)
      while d != os.path.dirname(created):
        try:
          os.rmdir(d)
        except OSError:
          break
        d = os.path.dirname(d)
    if isinstance(e, OSError):
      raise BadInputError(out_dir, f"cannot write the merged model "
                          f"({e.strerror or e})") from e
    raise
  return sorted(deltas)


def _write_merged(out_dir, base, deltas, layout, specs, adapter_dir):
  """Writes the shards of ``base + deltas`` into ``out_dir``."""
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
