"""The report of a recovery (``report.json``) and its plots."""

from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np

from detune_jax.pipeline.config import (FORMAT_VERSION, KINDS, RecoverConfig,
                                        grid_options)
from detune_jax.pipeline.inputs import Inputs
from detune_jax.pipeline.plan import Group, TensorPlan


def build_report(config: RecoverConfig, inputs: Inputs, fp: str,
                 plans: Sequence[TensorPlan], groups: Sequence[Group], *,
                 files: List[str], layers: List[dict], averaged: List[dict],
                 seconds: float, resumed: int, nproc: int) -> dict:
  """The report of a finished recovery.

  Args:
    config: the run's settings.
    inputs: its inputs.
    fp: its fingerprint.
    plans: every tensor's plan.
    groups: the layer groups.
    files: the output files written.
    layers: the solved layers' entries, in the model's order.
    averaged: the averaged tensors' entries.
    seconds: the run's wall seconds.
    resumed: groups found finished in the checkpoint.
    nproc: processes of the run.

  Returns:
    The report (see :mod:`detune_jax.pipeline`); with a ground truth, mean
    ``w_error`` and ``mean_lora_w_error`` over the layers and the
    ``bit_exact_fraction`` of all their weights; with ``explain_steps`` an
    ``explain`` summary.
  """
  counts = {k: sum(p.kind == k for p in plans) for k in KINDS}
  report = {
      "format": FORMAT_VERSION, "complete": True, "fingerprint": fp,
      "n_models": len(inputs.models), "output_dir": config.output_dir,
      "models": [m.path for m in inputs.models],
      "ground_truth": (getattr(inputs.ground_truth, "path", None)
                       if inputs.ground_truth is not None else None),
      "solver": config.solver, "dtype_aware": config.dtype_aware,
      "solver_options": {
          k: v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)
          for k, v in (list(config.solver_options)
                       + grid_options(config.grid))},
      "rank": str(config.rank),
      "ambiguous_rank": str(config.ambiguous_rank), "steps": config.steps,
      "seed": config.seed, "max_memory_gb": config.max_memory_gb,
      "seconds": seconds,
      "n_tensors": len(plans), "n_solved": counts["lora"],
      "n_averaged": counts["mean"], "n_copied": counts["copy"],
      "n_first": counts["first"],
      "first": [p.name for p in plans if p.kind == "first"],
      "groups": len(groups), "resumed_groups": resumed, "processes": nproc,
      "output_files": files,
  }
  if inputs.lowra is not None:
    b = inputs.lowra
    report["lowra_bench"] = {"path": b.path, "subset": b.subset,
                             "lora_ids": b.lora_ids}
  if inputs.ground_truth is not None and layers:
    report.update(_against_the_truth(layers))
  if config.explain_steps:
    report["explain"] = _explained(layers, config.explain_steps)
  report["averaged"] = averaged
  report["layers"] = layers
  return report


def _against_the_truth(layers: List[dict]) -> dict:
  """The layers' mean W-Errors, and the bit-exact share of their weights
  (layers weighted by their number of entries)."""
  we = [l["w_error"] for l in layers if l.get("w_error") is not None]
  me = [l["mean_lora_w_error"] for l in layers
        if l.get("mean_lora_w_error") is not None]
  ex = [(l["bit_exact_fraction"], math.prod(l["shape"])) for l in layers
        if l.get("bit_exact_fraction") is not None]
  return {"w_error": float(np.mean(we)) if we else None,
          "mean_lora_w_error": float(np.mean(me)) if me else None,
          "bit_exact_fraction": (sum(f * c for f, c in ex) /
                                 sum(c for _, c in ex) if ex else None)}


def _explained(layers: List[dict], steps: int) -> dict:
  """The ``explain`` summary over the bf16/fp16 layers (reproduced:
  weighted by their entries)."""
  ex = [(l["explained"], l["reproduced_fraction"], math.prod(l["shape"]))
        for l in layers if "explained" in l]
  return {"steps": steps, "layers": len(ex),
          "explained_layers": sum(e for e, _, _ in ex),
          "reproduced_fraction": (sum(r * c for _, r, c in ex) /
                                  sum(c for _, _, c in ex) if ex else None)}


def make_plots(report: dict, out_dir: str) -> List[str]:
  """Writes the report's PNG plots to ``out_dir``; returns their paths."""
  from detune_jax import plots  # matplotlib: only when plots are asked for
  return plots.make_plots(report, out_dir)
