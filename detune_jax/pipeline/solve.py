"""Solving one group of same-shape layers: read the stack, solve it, and
build the checkpoint tree."""

from __future__ import annotations

import time
from typing import Dict, Optional

import jax
import numpy as np
from absl import logging

from detune_jax.io.safetensors_io import DTYPES
from detune_jax.parallel import solve_layers
from detune_jax.pipeline.config import RecoverConfig
from detune_jax.pipeline.evaluate import evaluate_group
from detune_jax.pipeline.inputs import Inputs
from detune_jax.pipeline.plan import Group, TensorPlan
from detune_jax.solvers.grid import GridSettings
from detune_jax.solvers.spectral_detuning import precompile
from detune_jax.timings import Timings


def solve_group(group: Group, inputs: Inputs, plans: Dict[str, TensorPlan],
                config: RecoverConfig,
                timings: Optional[Timings] = None) -> Dict[str, np.ndarray]:
  """Reads and solves one batch of layers.

  ``timings`` (optional) gets the time spent reading (``read``), solving
  (``solve``) and comparing with the ground truth (``evaluate``).

  Returns:
    The checkpoint tree: ``W_<l>`` (recovered, in the layer's dtype),
    ``loss`` ``[L, steps]``, ``steps`` ``[L]``, ``final_rank`` ``[L, n]``,
    ``final_loss`` ``[L]``, ``w_error`` / ``mean_lora_w_error`` ``[L]``
    (nan without ground truth), ``seconds``, and with
    ``config.explain_steps`` ``explained`` ``[L]`` (1, 0, or -1 where the
    layer is not bf16/fp16) and ``reproduced`` ``[L]`` (nan there).
  """
  t0 = time.time()
  timings = timings or Timings()
  stack = _read_group(group, inputs, config, timings)
  L = len(group.names)
  dtypes = {plans[name].dtype for name in group.names}
  grid_opts = {"dtype_aware": False}
  if config.dtype_aware and len(dtypes) == 1:
    grid_opts = {"input_dtype": np.dtype(DTYPES[dtypes.pop()])}
  with timings.phase("solve"):
    W, diag = solve_layers(stack, group.rank_arg, devices=jax.local_devices(),
                           solver=config.solver, steps=config.steps,
                           seed=config.seed, grid=config.grid, **grid_opts,
                           **dict(config.solver_options))
    W = np.asarray(W, np.float32)
  _log_grid_skips(diag, grid_opts.get("input_dtype"), config.grid)
  with timings.phase("evaluate"):
    outputs = [W[l].reshape(plans[name].shape).astype(
        DTYPES[plans[name].dtype]) for l, name in enumerate(group.names)]
    checks = evaluate_group(outputs, stack, group, inputs, plans, config)
    tree = {f"W_{l}": out for l, out in enumerate(outputs)}
    tree.update(
        loss=np.asarray(diag.loss, np.float32).reshape(L, -1),
        steps=np.asarray(diag.steps, np.int32).reshape(L),
        final_rank=np.asarray(diag.final_rank, np.int32).reshape(L, -1),
        final_loss=np.asarray(diag.final_loss, np.float32).reshape(L))
    tree.update(checks)
    tree["seconds"] = np.asarray(time.time() - t0, np.float64)
    return tree


def _read_group(group: Group, inputs: Inputs, config: RecoverConfig,
                timings: Timings) -> np.ndarray:
  """The group's ``[L, n, d, k]`` float32 stack (for ``spectral_detuning``
  on one device, its program is compiled first)."""
  d, k = group.matrix_shape
  n = len(inputs.models)
  L = len(group.names)
  if (config.solver == "spectral_detuning" and not config.solver_options
      and len(jax.local_devices()) == 1):
    # Compile from the shape before the stack is read, and give the
    # compiler's heap back (a cache hit for later groups of this shape).
    with timings.phase("solve"):
      precompile((L, n, d, k), group.rank_arg, config.steps, seed=config.seed)
  with timings.phase("read"):
    stack = np.empty((L, n, d, k), np.float32)
    for l, name in enumerate(group.names):
      for i, m in enumerate(inputs.models):
        stack[l, i] = np.asarray(m.read(name), np.float32).reshape(d, k)
  return stack


def _log_grid_skips(diag, dtype, grid_settings: GridSettings):
  """Warns of the layers whose grid step was skipped (``diag``: the
  solver's :class:`detune_jax.SolveDiagnostics`): solvers do not log."""
  if diag.grid_kept is None:
    return
  off = ~np.asarray(diag.grid_kept)
  if off.any():
    logging.warning(
        "grid step skipped on %d of %d layers: it ends with the releases "
        "not consistent with a base on the %s grid (consistent fraction "
        "%.2f < %.2f; e.g. fine-tunes of a float32 base each rounded on its "
        "own, or two releases, which do not pin the base); those layers "
        "keep the solver's estimate", off.sum(), off.size, dtype,
        float(np.min(np.asarray(diag.grid.consistent_fraction))),
        float(grid_settings.min_consistent))
