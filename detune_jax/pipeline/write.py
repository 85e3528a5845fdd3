"""Writing the recovered model: its files from the checkpoint and the first
model, and each solved layer's report entry."""

from __future__ import annotations

import math
import os
from typing import Dict, List, Tuple

import numpy as np

from detune_jax import metrics
from detune_jax.io.models import output_layout, write_index
from detune_jax.io.progress import Progress
from detune_jax.io.safetensors_io import DTYPES, SafetensorsWriter
from detune_jax.pipeline.inputs import Inputs
from detune_jax.pipeline.plan import Group, TensorPlan


def assemble(out_dir: str, inputs: Inputs, plans: List[TensorPlan],
             groups: List[Group], progress: Progress) -> Tuple[
                 List[str], List[dict], List[dict], float]:
  """Writes the output model files from the checkpoint and the first model.

  Returns:
    ``(output files, layer entries, averaged entries, solve seconds)`` for
    the report.
  """
  ref = inputs.models[0]
  if inputs.lowra is not None:
    layout, sharded = [("model.safetensors", list(ref.names))], False
  else:
    layout, sharded = output_layout(ref)
  specs = {p.name: (p.dtype, p.shape) for p in plans}
  writers, where = {}, {}
  try:
    for fname, names in layout:
      writers[fname] = SafetensorsWriter(
          os.path.join(out_dir, fname), [(n,) + specs[n] for n in names],
          getattr(ref, "metadata", None))
      for n in names:
        where[n] = writers[fname]
    averaged = _write_unsolved(inputs, plans, where)
    layers, seconds = _write_solved(inputs, plans, groups, progress, where)
    for w in writers.values():
      w.commit()
  except BaseException:
    for w in writers.values():
      w.abort()
    raise
  files = [f for f, _ in layout]
  if sharded:
    write_index(out_dir, layout, specs, getattr(ref, "index_metadata", None))
    files.append("model.safetensors.index.json")
  ordered = [layers[p.name] for p in plans if p.name in layers]
  return files, ordered, averaged, seconds


def _write_unsolved(inputs: Inputs, plans: List[TensorPlan],
                    where) -> List[dict]:
  """Writes the copied and averaged tensors (``where``: each tensor's
  writer); returns the averaged ones' report entries."""
  ref = inputs.models[0]
  gt = inputs.ground_truth
  averaged = []
  for p in plans:
    if p.kind in ("copy", "first"):
      where[p.name].write_bytes(p.name, ref.read_bytes(p.name))
    elif p.kind == "mean":
      mean = _mean_of(inputs, p.name, p)
      where[p.name].write(p.name, mean)
      entry = {"name": p.name, "shape": list(p.shape), "dtype": p.dtype}
      if gt is not None:
        entry["w_error"] = _num(metrics.layer_w_error(
            mean.astype(np.float32), np.asarray(gt.read(p.name),
                                                np.float32)))
      averaged.append(entry)
  return averaged


def _write_solved(inputs: Inputs, plans: List[TensorPlan],
                  groups: List[Group], progress: Progress,
                  where) -> Tuple[Dict[str, dict], float]:
  """Writes the solved layers from the checkpoint; returns their report
  entries by name and the groups' solve seconds."""
  by_name = {p.name: p for p in plans}
  gt = inputs.ground_truth
  layers, seconds = {}, 0.0
  for g in groups:
    tree = progress.load(g.index)
    seconds += float(tree["seconds"])
    for l, name in enumerate(g.names):
      where[name].write(name, tree[f"W_{l}"])
      layers[name] = _layer_entry(tree, l, by_name[name], g, gt is not None)
  return layers, seconds


def _layer_entry(tree, l: int, p: TensorPlan, g: Group,
                 ground_truth: bool) -> dict:
  """The report entry of layer ``l`` of group ``g`` (checkpoint ``tree``)."""
  steps = int(tree["steps"][l])
  curve = [float(x) for x in tree["loss"][l][:max(steps, 1)]]
  entry = {"name": p.name, "shape": list(p.shape), "dtype": p.dtype,
           "matrix_shape": list(g.matrix_shape), "rank": max(p.ranks),
           "ranks": list(p.ranks), "rank_source": p.rank_source,
           "steps": steps, "loss": _num(tree["final_loss"][l]),
           "final_rank": [int(r) for r in tree["final_rank"][l]],
           "group": g.index,
           "loss_curve": [c if math.isfinite(c) else None for c in curve]}
  if ground_truth:
    entry["w_error"] = _num(tree["w_error"][l])
    entry["mean_lora_w_error"] = _num(tree["mean_lora_w_error"][l])
    entry["bit_exact_fraction"] = _num(tree["bit_exact_fraction"][l])
  if "explained" in tree and int(tree["explained"][l]) >= 0:
    entry["explained"] = bool(tree["explained"][l])
    entry["reproduced_fraction"] = _num(tree["reproduced"][l])
  return entry


def _num(x):
  """``x`` as a float for JSON, None where it is not finite."""
  x = float(x)
  return None if not math.isfinite(x) else x


def _mean_of(inputs: Inputs, name: str, plan: TensorPlan) -> np.ndarray:
  """The models' mean of tensor ``name``, in its dtype."""
  acc = np.zeros(plan.shape, np.float32)
  for m in inputs.models:
    acc += np.asarray(m.read(name), np.float32)
  return (acc / len(inputs.models)).astype(DTYPES[plan.dtype])
