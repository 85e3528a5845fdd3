"""Checks of a solved group's outputs: against the ground truth when one is
given, and against the releases (``explain_steps``)."""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from detune_jax import metrics
from detune_jax.io.safetensors_io import DTYPES
from detune_jax.pipeline.config import RecoverConfig
from detune_jax.pipeline.inputs import Inputs
from detune_jax.pipeline.plan import Group, TensorPlan
from detune_jax.solvers import grid, grid_diagnostics


def evaluate_group(outputs: Sequence[np.ndarray], stack: np.ndarray,
                   group: Group, inputs: Inputs, plans: Dict[str, TensorPlan],
                   config: RecoverConfig) -> Dict[str, np.ndarray]:
  """Per-layer checks of a solved group.

  Args:
    outputs: the recovered layers as written (their shape and dtype).
    stack: the group's ``[L, n, d, k]`` float32 releases.
    group: the group.
    inputs: the run's inputs (the ground truth, if any).
    plans: the tensors' plans by name.
    config: the run's settings (``explain_steps``, ``seed``).

  Returns:
    ``w_error``, ``mean_lora_w_error`` and ``bit_exact_fraction`` ``[L]``
    (nan without ground truth), and with ``config.explain_steps``
    ``explained`` ``[L]`` (1, 0, or -1 where the layer is not bf16/fp16) and
    ``reproduced`` ``[L]`` (nan there).
  """
  d, k = group.matrix_shape
  L = len(group.names)
  w_err = np.full(L, np.nan, np.float32)
  mean_err = np.full(L, np.nan, np.float32)
  exact = np.full(L, np.nan, np.float32)
  explained = np.full(L, -1, np.int32)
  reproduced = np.full(L, np.nan, np.float64)
  gt = inputs.ground_truth
  for l, (name, out) in enumerate(zip(group.names, outputs)):
    p = plans[name]
    dtype = DTYPES[p.dtype]
    if config.explain_steps and p.dtype in ("BF16", "F16"):
      # The output as written, against the releases as read (one layer at a
      # time: the search holds float64 copies of the layer's stack).
      ex = grid_diagnostics.explain_releases(
          stack[l].astype(dtype), out.reshape(d, k), group.rank_arg,
          max_steps=config.explain_steps, seed=config.seed)
      explained[l] = int(ex.explained)
      reproduced[l] = float(ex.reproduced)
    if gt is not None:
      raw = np.asarray(gt.read(name))
      truth = raw.astype(np.float32).reshape(d, k)
      w_err[l] = float(metrics.layer_w_error(
          out.astype(np.float32).reshape(d, k), truth))
      exact[l] = float(grid.bit_exact_fraction(out, raw.astype(dtype)))
      mean = stack[l].mean(0).astype(dtype).astype(np.float32)
      mean_err[l] = float(metrics.layer_w_error(mean, truth))
  checks = dict(w_error=w_err, mean_lora_w_error=mean_err,
                bit_exact_fraction=exact)
  if config.explain_steps:
    checks.update(explained=explained, reproduced=reproduced)
  return checks
