"""Planning a recovery: what happens to each tensor (the scan), and which
layers are solved together under the memory budget."""

from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np
from absl import logging

from detune_jax.io.errors import BadInputError
from detune_jax.io.safetensors_io import FLOAT_DTYPES
from detune_jax.pipeline.config import (KINDS, RANK_SOURCES, RecoverConfig,
                                        parse_ambiguous, parse_rank)
from detune_jax.pipeline.inputs import Inputs
from detune_jax.solvers import detection, rank_estimation


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
  docs/results.md, "The grid step, and what `recover` budgets").
  """
  return 4 * d * k * ((11 * n + 2) if grid else (3 * n + 6))


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
  """Plans every tensor (see :mod:`detune_jax.pipeline`); all processes
  share it.

  Raises:
    BadInputError: non-finite values in a fine-tuned tensor, a rank too
      large for a layer, an ambiguous rank with ``ambiguous_rank="error"``,
      a fine-tuned tensor missing from the ground truth, two models equal
      in every tensor.
  """
  models = inputs.models
  rank = parse_rank(config.rank)
  table, distinct, warnings, error = _scan_share(
      inputs, config, rank, parse_ambiguous(config.ambiguous_rank))
  if jax.process_count() > 1:
    table, distinct = _gathered(table, distinct, error, models)
  _check_no_duplicates(models, distinct)
  # Warnings only once the scan has passed: bad input stays one line.
  for w in warnings:
    logging.warning("%s", w)
  if len(models) == 2 and rank == "auto" and jax.process_index() == 0:
    # W'_0 - W'_1 = M_0 - M_1 shows only the sum of the two ranks.
    logging.warning("with 2 models only the sum of each layer's two LoRA "
                    "ranks can be estimated; it is split evenly (give "
                    "--rank if the ranks are known). Three or more models "
                    "determine each rank, and the base far better.")
  plans = []
  for t, name in enumerate(models[0].names):
    info = models[0].info(name)
    kind = KINDS[table[t, 1]]
    src = RANK_SOURCES[table[t, 2]] if table[t, 2] >= 0 else ""
    ranks = tuple(int(r) for r in table[t, 3:]) if kind == "lora" else ()
    plans.append(TensorPlan(name, info.dtype, tuple(info.shape), kind, ranks,
                            src))
  return plans


def _scan_share(inputs: Inputs, config: RecoverConfig, rank, policy):
  """Scans this process's share of the tensors (every ``nproc``-th).

  Returns:
    ``(table, distinct, warnings, error)``: ``[tensors, 3 + n]`` int32 rows
    (:func:`_encode`; row ``[-1, ...]`` where this process found bad input,
    zeros for other processes' tensors), the ``[n, n]`` pairs of models seen
    to differ, the warnings, and the bad input found (multi-process only;
    one process raises it at once).
  """
  models = inputs.models
  names = list(models[0].names)
  n = len(models)
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
  return local, distinct, warnings, error


def _gathered(local: np.ndarray, distinct: np.ndarray, error, models):
  """``(table, distinct)`` of every process's share, or the bad input one
  of them found (its own error on the process that found it)."""
  from jax.experimental import multihost_utils
  nproc = jax.process_count()
  names = list(models[0].names)
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
  return table, distinct


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


def plans_to_json(plans: Sequence[TensorPlan]) -> List[dict]:
  """The plans as JSON objects (``plan.json``)."""
  return [p._asdict() for p in plans]


def plans_from_json(items) -> List[TensorPlan]:
  """The plans of :func:`plans_to_json`."""
  return [TensorPlan(d["name"], d["dtype"], tuple(d["shape"]), d["kind"],
                     tuple(d["ranks"]), d["rank_source"]) for d in items]
