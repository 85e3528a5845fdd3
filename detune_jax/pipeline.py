"""Whole-model recovery: detect -> group by shape -> batch -> solve -> write.

:func:`recover` takes n fine-tuned models (safetensors files or HF
directories, or the LoRAs of a LoWRA Bench subset) and writes the recovered
base model to ``OUT/model.safetensors`` (sharded like the input), a report
to ``OUT/report.json`` and its progress to an orbax checkpoint under
``OUT/checkpoint`` after every layer group, so that a killed run started
again with the same settings resumes where it stopped.

Steps:

1. Open and check the inputs (names, shapes, dtypes, file integrity, no
   model given twice) and the output directory (``OUT/run.json`` must hold
   the same run fingerprint).
2. Scan: read each tensor of the n models (memory-mapped, one tensor at a
   time). Bit-identical tensors are copied through. A differing tensor of 2+
   dims is a LoRA layer (conv kernels ``[o, i, kh, kw]`` are solved as
   ``[o, i*kh*kw]``); its values must be finite, and with ``rank="auto"`` its
   per-LoRA ranks are estimated (:func:`detune_jax.estimate_rank_details`).
   Two models equal in every tensor are bad input (they add no
   information), found from the tensors as they are compared.
   A differing tensor with fewer than 2 axes once leading size-1 axes are
   dropped (bias, norm, a ViT ``cls_token`` ``[1, 1, d]``) cannot be a LoRA
   update: it is written as the mean of the models and listed under
   ``averaged``. A
   differing non-float tensor is copied from the first model (``first``).
3. Group LoRA layers by (matrix shape, ranks) and cut the groups into batches
   that fit ``max_memory_gb``; each batch is solved at once (vmapped, sharded
   over the local devices by :func:`detune_jax.parallel.solve_layers`).
4. Assemble the output files from the checkpoint and the first model.

Ambiguous rank estimates (``rank="auto"``) follow ``ambiguous_rank``:
``"consistent"`` (default: keep the estimate when, with 3+ models, every
pairwise difference has a rank gap exactly at ``r_i + r_j`` of the per-LoRA
estimate, which is what bf16 releases look like, where rounding noise makes
the gaps weak; otherwise bad input naming the tensor), ``"error"`` (any
ambiguity is bad input), ``"guess"`` (use the estimator's best guess
anyway), ``"mean"`` (treat the tensor as averaged) or an int (use that
rank).

Multi-process (after :func:`initialize_distributed`): every process opens the
inputs, scans a strided share of the tensors (results are all-gathered), then
solves only the layer groups it owns, reading only their tensors. Process 0
saves into the orbax checkpoint; the others write part files that process 0
moves into it, then process 0 writes the model and the report; the others wait
for the report. The output is byte-identical to a one-process run with the
same number of local devices per process (the batches do not depend on the
process count; sharding a batch over a different number of devices, or a
different ``max_memory_gb``, can change the last bits, which is why
``max_memory_gb`` is part of the run fingerprint). All processes must see the
same output directory (a shared filesystem).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np
from absl import logging

from detune_jax import metrics
from detune_jax.timings import Timings
from detune_jax.io.errors import BadInputError
from detune_jax.io.lowra import LowraBench
from detune_jax.io.models import (ModelFiles, check_distinct_paths,
                                  check_same_tensors, output_layout,
                                  write_index)
from detune_jax.io.progress import (CHECKPOINT_DIR, PARTS_DIR, RUN_FILE,
                                    Progress, fingerprint, read_json,
                                    write_json_atomic)
from detune_jax.io.safetensors_io import DTYPES, FLOAT_DTYPES, SafetensorsWriter
from detune_jax.parallel import solve_layers
from detune_jax.solvers import (detection, grid, grid_diagnostics,
                                rank_estimation, registry)
from detune_jax.solvers.grid import GridSettings
from detune_jax.solvers.spectral_detuning import precompile

# 2: layer groups are split by dtype too (a checkpoint of format 1 may hold
# groups that mix dtypes, so it is not resumed).
FORMAT_VERSION = 2
REPORT_FILE = "report.json"
PLAN_FILE = "plan.json"
KINDS = ("copy", "lora", "mean", "first")
RANK_SOURCES = ("flag", "estimated", "guess", "fallback", "consistent")


@dataclasses.dataclass(frozen=True)
class RecoverConfig:
  """Settings of :func:`recover`.

  Attributes:
    models: paths of the fine-tuned models (files or HF directories).
    output_dir: where the model, report and checkpoint go.
    rank: ``"auto"`` (estimate per layer and per LoRA) or an int.
    steps: solver steps per layer.
    seed: solver seed.
    solver: a name in :data:`detune_jax.solvers.registry.SOLVERS`; ``"auto"``
      takes the closed form for n >= 3 (polished by one step, refined where
      ill-posed) and
      Spectral DeTuning otherwise.
    solver_options: extra keyword arguments of the solver.
    dtype_aware: for layers released in bfloat16/float16, refine the
      recovery on that dtype's grid (the base was released on it too).
    grid: settings of that grid step (:class:`detune_jax.GridSettings`; the
      defaults are the tool's, others serve ablations).
    max_memory_gb: memory budget of one batch of layers.
    ground_truth: optional path of the true base model (evaluation only).
    lowra_bench: path of a local LoWRA Bench copy (instead of ``models``).
    subset: LoWRA Bench subset, e.g. ``"vit"``.
    n_loras: number of LoWRA Bench LoRAs (the first ones) when ``lora_ids``
      is empty.
    lora_ids: LoWRA Bench LoRA indices to use.
    ambiguous_rank: ``"consistent"``, ``"error"``, ``"guess"``, ``"mean"``
      or an int (as str); see the module docstring.
    max_rank: largest per-LoRA rank ``rank="auto"`` considers.
    plots: also write PNG plots.
    explain_steps: 0, or check each bf16/fp16 layer's output against the
      releases: :func:`detune_jax.explain_releases` with this many
      projections at most looks for rank-``r_i`` updates with which the
      recovered weights reproduce every released value bit for bit. Found,
      the releases are exactly consistent with the output: no method that
      reads only them can tell it from the true base, so every weight it
      gets wrong is one they leave open. No ground truth is needed; the
      report gives per layer ``explained`` and ``reproduced_fraction``
      (the share of released values reproduced) and an ``explain``
      summary.
  """
  models: Tuple[str, ...] = ()
  output_dir: str = ""
  rank: str = "auto"
  steps: int = 300
  seed: int = 0
  solver: str = "auto"
  solver_options: Tuple[Tuple[str, object], ...] = ()
  dtype_aware: bool = True
  grid: GridSettings = GridSettings()
  max_memory_gb: float = 4.0
  ground_truth: Optional[str] = None
  lowra_bench: Optional[str] = None
  subset: Optional[str] = None
  n_loras: int = 5
  lora_ids: Tuple[int, ...] = ()
  ambiguous_rank: str = "consistent"
  max_rank: int = 256
  plots: bool = False
  explain_steps: int = 0


class TensorPlan(NamedTuple):
  """What happens to one tensor.

  Attributes:
    name, dtype, shape: as in the input files.
    kind: ``"copy"`` (identical in all models), ``"lora"`` (solved),
      ``"mean"`` (averaged) or ``"first"`` (non-float, from the first model).
    ranks: per-LoRA ranks (``"lora"`` only).
    rank_source: ``"flag"``, ``"estimated"``, ``"consistent"`` (weak gaps
      but consistent pairwise ranks), ``"guess"`` or ``"fallback"``.
  """
  name: str
  dtype: str
  shape: Tuple[int, ...]
  kind: str
  ranks: Tuple[int, ...] = ()
  rank_source: str = ""


class Group(NamedTuple):
  """A batch of same-shape, same-rank, same-dtype layers solved together."""
  index: int
  names: Tuple[str, ...]
  matrix_shape: Tuple[int, int]
  ranks: Tuple[int, ...]

  @property
  def rank_arg(self):
    """The solvers' ``rank``: one int when every LoRA has it, else the
    per-LoRA ranks."""
    return self.ranks[0] if len(set(self.ranks)) == 1 else tuple(self.ranks)


def matrix_shape(shape: Sequence[int]) -> Tuple[int, int]:
  """The 2-D matrix a tensor is solved as: ``[d, prod(rest)]``.

  >>> matrix_shape((320, 640, 3, 3))   # a conv kernel
  (320, 5760)
  """
  return int(shape[0]), int(math.prod(shape[1:]))


def _matrix_axes(shape: Sequence[int]) -> int:
  """Axes of ``shape`` once its leading size-1 axes are dropped: a tensor
  with fewer than 2 (``[d]``, ``[1, 1, d]``) cannot hold a LoRA update.

  >>> _matrix_axes((1, 1, 768)), _matrix_axes((1, 197, 768))
  (1, 2)
  """
  shape = list(shape)
  while shape and shape[0] == 1:
    shape.pop(0)
  return len(shape)


def layer_bytes(d: int, k: int, n: int, grid: bool = False) -> int:
  """Estimated solver memory of one ``[n, d, k]`` layer (float32 work
  arrays: the stack, residuals, low-rank terms and a few ``[d, k]``).

  With ``grid`` (a bf16/fp16 layer that runs the dtype-aware grid step),
  that step's, which needs more than the solver before it: XLA plans about
  ``9.5n`` ``[d, k]`` float32 arrays of temporaries for it (with the
  re-reading of the entries in doubt) beside its arguments, and the float32
  stack is held too (``python -m experiments.bench_closed_form
  --dtype=bfloat16`` prints the step's memory analysis and this budget;
  docs/results.md).
  """
  return 4 * d * k * ((11 * n + 2) if grid else (3 * n + 6))


def initialize_distributed(coordinator_address: str, num_processes: int,
                           process_id: int):
  """``jax.distributed.initialize`` for multi-process recovery.

  On CPU the cross-process collectives use gloo. Must run before any JAX
  computation. A no-op for ``num_processes <= 1``.
  """
  if num_processes <= 1:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id,
                             shutdown_timeout_seconds=3600)


# ---------------------------------------------------------------- inputs


class Inputs(NamedTuple):
  models: list
  ground_truth: object
  identity: dict
  lowra: Optional[LowraBench]


def _parse_rank(rank):
  if isinstance(rank, (int, np.integer)):
    r = int(rank)
  elif str(rank).strip().lower() == "auto":
    return "auto"
  else:
    try:
      r = int(str(rank))
    except ValueError:
      raise BadInputError("--rank", f"must be 'auto' or a positive int, got "
                          f"{rank!r}")
  if r < 1:
    raise BadInputError("--rank", f"must be >= 1, got {r}")
  return r


def _parse_ambiguous(policy):
  policy = str(policy).strip().lower()
  if policy in ("consistent", "error", "guess", "mean"):
    return policy
  try:
    r = int(policy)
  except ValueError:
    r = 0
  if r < 1:
    raise BadInputError("--ambiguous_rank", "must be consistent, error, "
                        f"guess, mean or a positive int, got {policy!r}")
  return r


def open_inputs(config: RecoverConfig) -> Inputs:
  """Opens and checks the models (or LoWRA Bench) and the ground truth.

  Raises:
    BadInputError: fewer than 2 models, missing/corrupt/pickle files,
      tensors that differ in name, shape or dtype.
  """
  if config.solver not in registry.SOLVERS:
    raise BadInputError("--solver", f"unknown solver {config.solver!r}; "
                        f"known: {sorted(registry.SOLVERS)}")
  if config.steps < 1:
    raise BadInputError("--steps", f"must be >= 1, got {config.steps}")
  if not config.max_memory_gb > 0:
    raise BadInputError("--max_memory_gb", "must be > 0")
  _parse_rank(config.rank)
  _parse_ambiguous(config.ambiguous_rank)
  if config.lowra_bench:
    if config.models or config.ground_truth:
      raise BadInputError("--lowra_bench", "takes neither --models nor "
                          "--ground_truth (the pre-FT weights are in the "
                          "parquet files)")
    n = len(config.lora_ids) or config.n_loras
    if n < 2:
      raise BadInputError("--n_loras", f"need at least 2 models, got {n}")
    bench = LowraBench(config.lowra_bench, config.subset,
                       lora_ids=config.lora_ids, n_loras=config.n_loras)
    return Inputs(bench.models, bench.ground_truth,
                  {"lowra": bench.identity()}, bench)
  if len(config.models) < 2:
    raise BadInputError(config.models[0] if config.models else "--models",
                        f"need at least 2 fine-tuned models, got "
                        f"{len(config.models)}")
  models = [ModelFiles(p) for p in config.models]
  check_distinct_paths(models)
  check_same_tensors(models)
  gt = None
  if config.ground_truth:
    gt = ModelFiles(config.ground_truth)
  identity = {"models": [m.identity() for m in models],
              "ground_truth": gt.identity() if gt else None}
  return Inputs(models, gt, identity, None)


def grid_options(grid_settings: GridSettings) -> List[Tuple[str, object]]:
  """The settings of ``grid_settings`` off their defaults, as ``(name,
  value)`` pairs named ``grid_<field>`` (how the report and the run's
  fingerprint record them beside the solver's options)."""
  default = GridSettings()
  return [(f"grid_{name}", value)
          for name, value in grid_settings._asdict().items()
          if value != getattr(default, name)]


def run_fingerprint(config: RecoverConfig, inputs: Inputs) -> str:
  """Fingerprint of everything that changes the output files."""
  return fingerprint({
      "format": FORMAT_VERSION, "inputs": inputs.identity,
      "rank": str(config.rank), "steps": config.steps, "seed": config.seed,
      "solver": config.solver,
      "solver_options": (list(config.solver_options)
                         + grid_options(config.grid)),
      "dtype_aware": config.dtype_aware, "max_memory_gb": config.max_memory_gb,
      "ambiguous_rank": str(config.ambiguous_rank),
      "max_rank": config.max_rank,
      # Only when on, so that earlier runs keep their fingerprint.
      **({"explain_steps": config.explain_steps}
         if config.explain_steps else {})})


def check_writable(out_dir: str):
  """Checks, writing nothing that stays, that ``out_dir`` can be created (or,
  when it exists, written): a directory is made and removed in it or in its
  nearest existing ancestor.

  Raises:
    BadInputError: an ancestor is a file, or the place is not writable.
  """
  existing = out_dir
  while not os.path.lexists(existing):
    parent = os.path.dirname(existing)
    if parent == existing:
      break
    existing = parent
  if not os.path.isdir(existing):
    what = ("output path exists and is not a directory" if existing == out_dir
            else f"cannot create the output directory: {existing} is not a "
            "directory")
    raise BadInputError(out_dir, what)
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".detune_write_test_", dir=existing))
  except OSError as e:
    raise BadInputError(out_dir, f"cannot write the output directory "
                        f"({e.strerror or e} in {existing})")


def check_output_dir(out_dir: str, fp: str) -> Optional[dict]:
  """Checks that ``out_dir`` is empty, new, or holds this very run.

  Returns:
    The finished report when this run already completed there, else None.

  Raises:
    BadInputError: the directory holds a different run.
  """
  if not os.path.exists(out_dir):
    return None
  if not os.path.isdir(out_dir):
    raise BadInputError(out_dir, "output path exists and is not a directory")
  run_path = os.path.join(out_dir, RUN_FILE)
  if os.path.exists(run_path):
    run = read_json(run_path)
    if not isinstance(run, dict):
      raise BadInputError(run_path, "not the run file of a recovery (not a "
                          "JSON object); use a new --output_dir")
    if run.get("fingerprint") != fp:
      raise BadInputError(out_dir, "output directory holds a different run "
                          "(other inputs or flags); use a new --output_dir")
  else:
    # Without run.json nothing here is this run's: refuse every name a run
    # writes rather than overwrite it.
    for f in (REPORT_FILE, "model.safetensors", "model.safetensors.index.json",
              CHECKPOINT_DIR, PLAN_FILE, PARTS_DIR):
      if os.path.lexists(os.path.join(out_dir, f)):
        raise BadInputError(out_dir, f"output directory holds {f} of another "
                            "run; use a new --output_dir")
    return None
  report = read_json(os.path.join(out_dir, REPORT_FILE))
  if (isinstance(report, dict) and report.get("fingerprint") == fp
      and report.get("complete")
      and all(os.path.exists(os.path.join(out_dir, f))
              for f in report.get("output_files", []))):
    return report
  return None


# ------------------------------------------------------------------ scan


def _mark_distinct(distinct: np.ndarray, arrays) -> None:
  """Sets ``distinct[i, j]`` where models ``i`` and ``j`` differ in this
  tensor (``arrays``: its version in each model); pairs already known to
  differ are not compared again."""
  n = len(arrays)
  for i in range(n):
    for j in range(i + 1, n):
      if not distinct[i, j] and not np.array_equal(
          detection.bits(np.asarray(arrays[i])),
          detection.bits(np.asarray(arrays[j]))):
        distinct[i, j] = distinct[j, i] = True


def _check_no_duplicates(models, distinct: np.ndarray) -> None:
  """Bad input when two models are equal in every tensor."""
  n = len(models)
  for i in range(n):
    for j in range(i + 1, n):
      if not distinct[i, j]:
        raise BadInputError(models[j].path, f"every tensor equals those of "
                            f"{models[i].path}: the same model twice adds "
                            "no information")


def _scan_tensor(name, inputs: Inputs, rank, policy, config,
                 distinct: Optional[np.ndarray] = None) -> Tuple[
                     TensorPlan, Optional[str]]:
  """Plans one tensor; returns ``(plan, warning or None)``. ``distinct``
  (``[n, n]`` bool) gets the pairs of models that differ in it."""
  models = inputs.models
  info = models[0].info(name)
  arrays = [m.read(name) for m in models]
  if not detection.is_finetuned(arrays):
    return TensorPlan(name, info.dtype, info.shape, "copy"), None
  if distinct is not None:
    _mark_distinct(distinct, arrays)
  if info.dtype not in FLOAT_DTYPES:
    return (TensorPlan(name, info.dtype, info.shape, "first"),
            f"{name}: non-float tensor differs between models; copied from "
            f"{models[0].path}")
  for m, a in zip(models, arrays):
    if not np.isfinite(np.asarray(a, np.float32)).all():
      raise BadInputError(m.file_of(name), "non-finite values (nan or inf) "
                          "in a fine-tuned tensor", tensor=name)
  gt = inputs.ground_truth
  if gt is not None:
    if name not in set(gt.names):
      raise BadInputError(getattr(gt, "path", "--ground_truth"), "fine-tuned "
                          "tensor missing from the ground truth", tensor=name)
    if tuple(gt.info(name).shape) != tuple(info.shape):
      raise BadInputError(gt.file_of(name), f"ground-truth shape "
                          f"{list(gt.info(name).shape)} != {list(info.shape)}",
                          tensor=name)
    if not np.isfinite(np.asarray(gt.read(name), np.float32)).all():
      raise BadInputError(gt.file_of(name), "non-finite values (nan or inf) "
                          "in the ground truth", tensor=name)
  if _matrix_axes(info.shape) < 2:   # a bias, a norm, a [1, 1, d] token
    return TensorPlan(name, info.dtype, info.shape, "mean"), None
  d, k = matrix_shape(info.shape)
  n = len(models)
  file = models[0].file_of(name)

  def checked(ranks, source, what):
    if max(ranks) > min(d, k):
      raise BadInputError(file, f"{what} {max(ranks)} is too large for this "
                          f"layer: [{d}, {k}] allows at most {min(d, k)}",
                          tensor=name)
    return TensorPlan(name, info.dtype, info.shape, "lora", tuple(ranks),
                      source)

  if rank != "auto":
    return checked((rank,) * n, "flag", "--rank"), None
  stack = np.stack([np.asarray(a, np.float32).reshape(d, k) for a in arrays])
  est = rank_estimation.estimate_rank_details(
      stack, max_rank=min(config.max_rank, min(d, k)), seed=config.seed)
  if not est.ambiguous:
    return checked(est.ranks, "estimated", "estimated rank"), None
  if policy == "consistent" and n >= 3 and all(
      0 < s < min(d, k) and s == est.ranks[i] + est.ranks[j]
      for (i, j), s in est.pair_ranks.items()):
    return checked(est.ranks, "consistent", "estimated rank"), None
  if policy in ("error", "consistent"):
    raise BadInputError(file, f"--rank=auto cannot tell the LoRA rank: "
                        f"{est.reason}; give --rank=N or "
                        f"--ambiguous_rank=guess|mean|N", tensor=name)
  warn = f"{name}: ambiguous rank estimate ({est.reason}); "
  if policy == "mean":
    return (TensorPlan(name, info.dtype, info.shape, "mean"),
            warn + "averaged instead")
  if policy == "guess":
    return (checked(est.ranks, "guess", "guessed rank"),
            warn + f"using the guess {list(est.ranks)}")
  return (checked((policy,) * n, "fallback", "--ambiguous_rank"),
          warn + f"using rank {policy}")


def _encode(p: TensorPlan, n: int) -> np.ndarray:
  row = np.zeros(3 + n, np.int32)
  row[0] = 1
  row[1] = KINDS.index(p.kind)
  row[2] = RANK_SOURCES.index(p.rank_source) if p.rank_source else -1
  if p.ranks:
    row[3:] = p.ranks
  return row


def scan(inputs: Inputs, config: RecoverConfig) -> List[TensorPlan]:
  """Plans every tensor (see the module docstring); all processes share it.

  Raises:
    BadInputError: non-finite values in a fine-tuned tensor, a rank too
      large for a layer, an ambiguous rank with ``ambiguous_rank="error"``,
      a fine-tuned tensor missing from the ground truth, two models equal
      in every tensor.
  """
  models = inputs.models
  names = list(models[0].names)
  n = len(models)
  rank = _parse_rank(config.rank)
  policy = _parse_ambiguous(config.ambiguous_rank)
  pid, nproc = jax.process_index(), jax.process_count()
  local = np.zeros((len(names), 3 + n), np.int32)
  distinct = np.zeros((n, n), bool)
  warnings, error = [], None
  for t in range(pid, len(names), nproc):
    try:
      plan, warn = _scan_tensor(names[t], inputs, rank, policy, config,
                                distinct)
    except BadInputError as e:
      if nproc == 1:
        # Two equal models (e.g. a rank that cannot be estimated from
        # them) are the cause to report: look at the remaining tensors.
        for name in names[t + 1:]:
          _mark_distinct(distinct, [m.read(name) for m in models])
        _check_no_duplicates(models, distinct)
        raise
      error = e
      local[t, 0] = -1
      break
    local[t] = _encode(plan, n)
    if warn:
      warnings.append(warn)
  if nproc > 1:
    from jax.experimental import multihost_utils
    distinct = np.asarray(multihost_utils.process_allgather(
        distinct.astype(np.int32))).any(axis=0)
    gathered = np.asarray(multihost_utils.process_allgather(local))
    table = np.zeros_like(local)
    for t in range(len(names)):
      table[t] = gathered[t % nproc, t]
    bad = np.nonzero(table[:, 0] == -1)[0]
    if bad.size:
      t = int(bad[0])
      if error is not None:
        raise error
      raise BadInputError(models[0].file_of(names[t]), f"bad input found by "
                          f"process {t % nproc} (see its error)",
                          tensor=names[t])
  else:
    table = local
  _check_no_duplicates(models, distinct)
  # Warnings only once the scan has passed: bad input stays one line.
  for w in warnings:
    logging.warning("%s", w)
  if n == 2 and rank == "auto" and pid == 0:
    # W'_0 - W'_1 = M_0 - M_1 shows only the sum of the two ranks.
    logging.warning("with 2 models only the sum of each layer's two LoRA "
                    "ranks can be estimated; it is split evenly (give "
                    "--rank if the ranks are known). Three or more models "
                    "determine each rank, and the base far better.")
  plans = []
  for t, name in enumerate(names):
    info = models[0].info(name)
    kind = KINDS[table[t, 1]]
    src = RANK_SOURCES[table[t, 2]] if table[t, 2] >= 0 else ""
    ranks = tuple(int(r) for r in table[t, 3:]) if kind == "lora" else ()
    plans.append(TensorPlan(name, info.dtype, tuple(info.shape), kind, ranks,
                            src))
  return plans


def make_groups(plans: Sequence[TensorPlan], n: int,
                max_memory_gb: float, grid: bool = False) -> List[Group]:
  """Batches the LoRA layers by (matrix shape, ranks, dtype) under the budget.

  Layers keep their order in the model; a batch holds at least one layer.
  A batch holds one dtype: the dtype-aware grid step refines a batch on
  its one release dtype, so a bf16 layer batched with a float32 one of the
  same shape would lose it. With ``grid`` (the dtype-aware grid step on),
  bf16/fp16 layers are budgeted for that step (:func:`layer_bytes`).
  """
  by_key: Dict[tuple, List[str]] = {}
  for p in plans:
    if p.kind == "lora":
      key = (matrix_shape(p.shape), p.ranks, p.dtype)
      by_key.setdefault(key, []).append(p.name)
  groups = []
  budget = max_memory_gb * 2**30
  for (mshape, ranks, dtype), names in by_key.items():
    low = dtype in ("BF16", "F16")
    per = max(1, int(budget // layer_bytes(*mshape, n, grid=grid and low)))
    for s in range(0, len(names), per):
      groups.append(Group(len(groups), tuple(names[s:s + per]), mshape, ranks))
  return groups


def assign_groups(groups: Sequence[Group], nproc: int) -> List[int]:
  """Owner process of each group: largest first to the least loaded."""
  load = [0] * nproc
  owner = [0] * len(groups)
  cost = lambda g: len(g.names) * g.matrix_shape[0] * g.matrix_shape[1]
  for g in sorted(groups, key=lambda g: (-cost(g), g.index)):
    p = min(range(nproc), key=lambda i: (load[i], i))
    owner[g.index] = p
    load[p] += cost(g)
  return owner


# ----------------------------------------------------------------- solve


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
  d, k = group.matrix_shape
  n = len(inputs.models)
  L = len(group.names)
  rank_arg = group.rank_arg
  if (config.solver == "spectral_detuning" and not config.solver_options
      and len(jax.local_devices()) == 1):
    # Compile from the shape before the stack is read, and give the
    # compiler's heap back (a cache hit for later groups of this shape).
    with timings.phase("solve"):
      precompile((L, n, d, k), rank_arg, config.steps, seed=config.seed)
  with timings.phase("read"):
    stack = np.empty((L, n, d, k), np.float32)
    for l, name in enumerate(group.names):
      for i, m in enumerate(inputs.models):
        stack[l, i] = np.asarray(m.read(name), np.float32).reshape(d, k)
  dtypes = {plans[name].dtype for name in group.names}
  grid_opts = {"dtype_aware": False}
  if config.dtype_aware and len(dtypes) == 1:
    grid_opts = {"input_dtype": np.dtype(DTYPES[dtypes.pop()])}
  with timings.phase("solve"):
    W, diag = solve_layers(stack, rank_arg, devices=jax.local_devices(),
                           solver=config.solver, steps=config.steps,
                           seed=config.seed, grid=config.grid, **grid_opts,
                           **dict(config.solver_options))
    W = np.asarray(W, np.float32)
  _log_grid_skips(diag, grid_opts.get("input_dtype"), config.grid)
  with timings.phase("evaluate"):
    return _finish_group(W, diag, stack, group, inputs, plans, config, t0)


def _log_grid_skips(diag, dtype, grid_settings: GridSettings):
  """Warns of the layers whose grid step was skipped (``diag``: the
  solver's :class:`detune_jax.SolveDiagnostics`)."""
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


def _finish_group(W, diag, stack, group, inputs, plans, config, t0):
  """The checkpoint tree of a solved group (see :func:`solve_group`)."""
  d, k = group.matrix_shape
  L = len(group.names)
  rank_arg = group.rank_arg
  tree = {}
  w_err = np.full(L, np.nan, np.float32)
  mean_err = np.full(L, np.nan, np.float32)
  exact = np.full(L, np.nan, np.float32)
  explained = np.full(L, -1, np.int32)
  reproduced = np.full(L, np.nan, np.float64)
  gt = inputs.ground_truth
  for l, name in enumerate(group.names):
    p = plans[name]
    dtype = DTYPES[p.dtype]
    out = W[l].reshape(p.shape).astype(dtype)
    tree[f"W_{l}"] = out
    if config.explain_steps and p.dtype in ("BF16", "F16"):
      # The output as written, against the releases as read (one layer at a
      # time: the search holds float64 copies of the layer's stack).
      ex = grid_diagnostics.explain_releases(stack[l].astype(dtype), out.reshape(d, k),
                                             rank_arg,
                                             max_steps=config.explain_steps,
                                             seed=config.seed)
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
  tree.update(
      loss=np.asarray(diag.loss, np.float32).reshape(L, -1),
      steps=np.asarray(diag.steps, np.int32).reshape(L),
      final_rank=np.asarray(diag.final_rank, np.int32).reshape(L, -1),
      final_loss=np.asarray(diag.final_loss, np.float32).reshape(L),
      w_error=w_err, mean_lora_w_error=mean_err, bit_exact_fraction=exact,
      seconds=np.asarray(time.time() - t0, np.float64))
  if config.explain_steps:
    tree.update(explained=explained, reproduced=reproduced)
  return tree


# -------------------------------------------------------------- assemble


def _num(x):
  x = float(x)
  return None if not math.isfinite(x) else x


def _mean_of(inputs: Inputs, name: str, plan: TensorPlan) -> np.ndarray:
  acc = np.zeros(plan.shape, np.float32)
  for m in inputs.models:
    acc += np.asarray(m.read(name), np.float32)
  return (acc / len(inputs.models)).astype(DTYPES[plan.dtype])


def assemble(out_dir: str, inputs: Inputs, plans: List[TensorPlan],
             groups: List[Group], progress: Progress) -> Tuple[
                 List[str], List[dict], List[dict]]:
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
  by_name = {p.name: p for p in plans}
  specs = {p.name: (p.dtype, p.shape) for p in plans}
  writers, where = {}, {}
  gt = inputs.ground_truth
  try:
    for fname, names in layout:
      writers[fname] = SafetensorsWriter(
          os.path.join(out_dir, fname), [(n,) + specs[n] for n in names],
          getattr(ref, "metadata", None))
      for n in names:
        where[n] = writers[fname]
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
    layers, seconds = {}, 0.0
    for g in groups:
      tree = progress.load(g.index)
      seconds += float(tree["seconds"])
      for l, name in enumerate(g.names):
        where[name].write(name, tree[f"W_{l}"])
        p = by_name[name]
        steps = int(tree["steps"][l])
        curve = [float(x) for x in tree["loss"][l][:max(steps, 1)]]
        entry = {"name": name, "shape": list(p.shape), "dtype": p.dtype,
                 "matrix_shape": list(g.matrix_shape), "rank": max(p.ranks),
                 "ranks": list(p.ranks), "rank_source": p.rank_source,
                 "steps": steps, "loss": _num(tree["final_loss"][l]),
                 "final_rank": [int(r) for r in tree["final_rank"][l]],
                 "group": g.index,
                 "loss_curve": [c if math.isfinite(c) else None
                                for c in curve]}
        if gt is not None:
          entry["w_error"] = _num(tree["w_error"][l])
          entry["mean_lora_w_error"] = _num(tree["mean_lora_w_error"][l])
          entry["bit_exact_fraction"] = _num(tree["bit_exact_fraction"][l])
        if "explained" in tree and int(tree["explained"][l]) >= 0:
          entry["explained"] = bool(tree["explained"][l])
          entry["reproduced_fraction"] = _num(tree["reproduced"][l])
        layers[name] = entry
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


# ----------------------------------------------------------------- main


def _plans_to_json(plans):
  return [p._asdict() for p in plans]


def _plans_from_json(items):
  return [TensorPlan(d["name"], d["dtype"], tuple(d["shape"]), d["kind"],
                     tuple(d["ranks"]), d["rank_source"]) for d in items]


def _all_true(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  got = multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))
  return bool(np.asarray(got).min())


def recover(config: RecoverConfig, *,
            on_group_done: Optional[Callable[[int], None]] = None,
            progress_bar: bool = True) -> dict:
  """Recovers the pre-fine-tuning model; see the module docstring.

  Args:
    config: :class:`RecoverConfig`.
    on_group_done: called with the number of groups this call has solved,
      after each one is checkpointed (tests use it to stop a run).
    progress_bar: show a tqdm bar of layers (with ETA) on stderr.

  Returns:
    The report (also written to ``OUT/report.json`` by process 0; other
    processes return it once process 0 has written it).

  Raises:
    BadInputError: bad input (nothing is written to the output directory
      when raised before the scan ends, which covers every check).
  """
  t_start = time.time()
  timings = Timings()
  if not config.output_dir:
    raise BadInputError("--output_dir", "is required")
  # Absolute from here on: orbax refuses relative checkpoint paths.
  config = dataclasses.replace(config,
                               output_dir=os.path.abspath(config.output_dir))
  out_dir = config.output_dir
  with timings.phase("open"):
    check_writable(out_dir)   # before the (long) scan
    inputs = open_inputs(config)
    fp = run_fingerprint(config, inputs)
    done_report = check_output_dir(out_dir, fp)
  pid, nproc = jax.process_index(), jax.process_count()
  if _all_true(done_report is not None):
    logging.info("%s already holds this finished run", out_dir)
    if config.plots and pid == 0:
      _make_plots(done_report, out_dir)
    return done_report
  plan_json = read_json(os.path.join(out_dir, PLAN_FILE))
  cached = isinstance(plan_json, dict) and plan_json.get("fingerprint") == fp
  with timings.phase("scan"):
    if _all_true(cached):
      plans = _plans_from_json(plan_json["tensors"])
    else:
      plans = scan(inputs, config)
  n = len(inputs.models)
  counts = {k: sum(p.kind == k for p in plans) for k in KINDS}
  logging.info("%d tensors: %d fine-tuned LoRA layers, %d averaged, %d copied",
               len(plans), counts["lora"], counts["mean"],
               counts["copy"] + counts["first"])
  if not counts["lora"] and not counts["mean"] and pid == 0:
    logging.warning("no float tensor differs between the %d models: the "
                    "output is a copy of %s", len(inputs.models),
                    inputs.models[0].path)
  # Every check has passed: from here on the output directory is written.
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise BadInputError(out_dir, f"cannot create the output directory "
                        f"({e.strerror or e})")
  if pid == 0:
    write_json_atomic(os.path.join(out_dir, RUN_FILE),
                      {"fingerprint": fp, "format": FORMAT_VERSION,
                       "config": dataclasses.asdict(config)})
    if not cached:
      write_json_atomic(os.path.join(out_dir, PLAN_FILE),
                        {"fingerprint": fp, "tensors": _plans_to_json(plans)})
  groups = make_groups(plans, n, config.max_memory_gb,
                       grid=config.dtype_aware
                       and registry.takes_grid_step(config.solver))
  owner = assign_groups(groups, nproc)
  with timings.phase("write"):
    progress = Progress(out_dir, pid)
  done_before = progress.done()
  mine = [g for g in groups if owner[g.index] == pid]
  todo = [g for g in mine if g.index not in done_before]
  plan_by_name = {p.name: p for p in plans}
  logging.info("%d layer groups (%d here, %d already done)", len(groups),
               len(mine), len(mine) - len(todo))
  bar = None
  logs = contextlib.nullcontext()
  if progress_bar:
    from tqdm import tqdm
    bar = tqdm(total=sum(len(g.names) for g in mine),
               initial=sum(len(g.names) for g in mine if g not in todo),
               unit="layer", desc=f"recover[{pid}]" if nproc > 1 else "recover",
               dynamic_ncols=True)
    logs = _logs_above_the_bar()
  try:
    with logs:
      for count, g in enumerate(todo, 1):
        tree = solve_group(g, inputs, plan_by_name, config, timings)
        with timings.phase("write"):
          progress.save(g.index, tree)
        logging.info("group %d/%d: %d x %s ranks %s in %.1fs", g.index + 1,
                     len(groups), len(g.names), list(g.matrix_shape),
                     list(g.ranks), float(tree["seconds"]))
        if bar is not None:
          bar.update(len(g.names))
        if on_group_done is not None:
          on_group_done(count)
  finally:
    if bar is not None:
      bar.close()
  report_path = os.path.join(out_dir, REPORT_FILE)
  if pid != 0:
    # Wait for process 0 to assemble the model from everyone's groups.
    while True:
      rep = read_json(report_path)
      if (isinstance(rep, dict) and rep.get("fingerprint") == fp
          and rep.get("complete")):
        progress.close()
        return rep
      time.sleep(0.2)
  all_groups = {g.index for g in groups}
  while not all_groups <= progress.done():
    time.sleep(0.2)
  with timings.phase("write"):
    progress.ingest_parts()
    files, layers, averaged, solve_seconds = assemble(out_dir, inputs, plans,
                                                     groups, progress)
    progress.close()
  report = _report(config, inputs, fp, plans, groups, layers, averaged, files,
                   t_start, len(done_before & all_groups), nproc)
  report["solve_seconds"] = solve_seconds
  # Seconds by phase of this call (a resumed run counts only its own work);
  # JAX's tracing and compiling, wherever it happened, under "compile".
  report["timings"] = timings.summary()
  write_json_atomic(report_path, report)
  if nproc == 1:   # parts/ is for multi-process runs: no empty folder here
    try:
      os.rmdir(os.path.join(out_dir, PARTS_DIR))
    except OSError:
      pass
  if config.plots:
    _make_plots(report, out_dir)
  return report


@contextlib.contextmanager
def _logs_above_the_bar():
  """Log lines written while the progress bar shows go above it (through
  ``tqdm.write``), not into the bar's line."""
  from absl import logging as absl_logging
  from tqdm import tqdm
  handler = absl_logging.get_absl_handler().python_handler
  stream = handler.stream

  class _AboveTheBar:

    def write(self, text):
      if text.strip():
        tqdm.write(text.rstrip("\n"), file=stream)

    def flush(self):
      stream.flush()

  handler.stream = _AboveTheBar()
  try:
    yield
  finally:
    handler.stream = stream


def _report(config, inputs, fp, plans, groups, layers, averaged, files,
            t_start, resumed, nproc) -> dict:
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
      "seconds": time.time() - t_start,
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
    we = [l["w_error"] for l in layers if l.get("w_error") is not None]
    me = [l["mean_lora_w_error"] for l in layers
          if l.get("mean_lora_w_error") is not None]
    report["w_error"] = float(np.mean(we)) if we else None
    report["mean_lora_w_error"] = float(np.mean(me)) if me else None
    # Over all solved weights (layers weighted by their number of entries).
    ex = [(l["bit_exact_fraction"], math.prod(l["shape"])) for l in layers
          if l.get("bit_exact_fraction") is not None]
    report["bit_exact_fraction"] = (
        sum(f * c for f, c in ex) / sum(c for _, c in ex) if ex else None)
  if config.explain_steps:
    # Over the bf16/fp16 layers (reproduced: weighted by their entries).
    ex = [(l["explained"], l["reproduced_fraction"], math.prod(l["shape"]))
          for l in layers if "explained" in l]
    report["explain"] = {
        "steps": config.explain_steps, "layers": len(ex),
        "explained_layers": sum(e for e, _, _ in ex),
        "reproduced_fraction": (sum(r * c for _, r, c in ex) /
                                sum(c for _, _, c in ex) if ex else None)}
  report["averaged"] = averaged
  report["layers"] = layers
  return report


def _make_plots(report: dict, out_dir: str) -> List[str]:
  from detune_jax import plots
  return plots.make_plots(report, out_dir)


def demo(output_dir: Optional[str] = None, *, work_dir: Optional[str] = None,
         steps: int = 300, seed: int = 0, dtype=np.float32,
         ranks: Sequence[int] = (4, 8, 8, 12, 16), progress_bar: bool = True,
         **overrides) -> dict:
  """The embedded example: a real recovery of synthetic LoRA fine-tunes.

  Writes a small base model and ``len(ranks)`` LoRA fine-tunes of it (six
  256x256 attention layers, a 1x1 conv and untouched
  embeddings, norms and biases; per-LoRA ranks ``ranks``) under
  ``work_dir``, recovers the base with ``rank="auto"`` and evaluates it
  against the true base.

  Args:
    output_dir: where the recovery goes (default ``work_dir/recovered``).
    work_dir: where the models go (default: a new temporary directory).
    steps: solver steps.
    seed: seed of the models and of the solver.
    dtype: dtype of the model files.
    ranks: per-model LoRA ranks.
    progress_bar: show the progress bar.
    **overrides: other :class:`RecoverConfig` fields.

  Returns:
    The report, with ``w_error`` and ``mean_lora_w_error``.
  """
  from detune_jax.io.synthetic import make_lora_models
  work_dir = work_dir or tempfile.mkdtemp(prefix="detune_demo_")
  models, base = make_lora_models(os.path.join(work_dir, "models"),
                                  n=len(ranks), ranks=list(ranks),
                                  dtype=dtype, seed=seed)
  config = RecoverConfig(models=tuple(models),
                         output_dir=output_dir or os.path.join(work_dir,
                                                               "recovered"),
                         ground_truth=base, steps=steps, seed=seed,
                         **overrides)
  return recover(config, progress_bar=progress_bar)
