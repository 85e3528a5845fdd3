"""Settings of a recovery, and the checks that need nothing but them."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import numpy as np

from detune_jax.io.errors import BadInputError
from detune_jax.solvers import registry
from detune_jax.solvers.grid import GridSettings

# 2: layer groups are split by dtype too (a checkpoint of format 1 may hold
# groups that mix dtypes, so it is not resumed).
FORMAT_VERSION = 2
REPORT_FILE = "report.json"
PLAN_FILE = "plan.json"
KINDS = ("copy", "lora", "mean", "first")
RANK_SOURCES = ("flag", "estimated", "guess", "fallback", "consistent")


@dataclasses.dataclass(frozen=True)
class RecoverConfig:
  """Settings of :func:`detune_jax.pipeline.recover`.

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
      or an int (as str); see :mod:`detune_jax.pipeline`.
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


def check_config(config: RecoverConfig):
  """Checks the settings that need no file.

  Raises:
    BadInputError: an unknown solver, ``steps`` below 1, a budget not above
      0, a rank or ambiguous-rank policy that does not parse.
  """
  if config.solver not in registry.SOLVERS:
    raise BadInputError("--solver", f"unknown solver {config.solver!r}; "
                        f"known: {sorted(registry.SOLVERS)}")
  if config.steps < 1:
    raise BadInputError("--steps", f"must be >= 1, got {config.steps}")
  if not config.max_memory_gb > 0:
    raise BadInputError("--max_memory_gb", "must be > 0")
  parse_rank(config.rank)
  parse_ambiguous(config.ambiguous_rank)


def parse_rank(rank):
  """``"auto"`` or the rank as a positive int; else bad input."""
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


def parse_ambiguous(policy):
  """The ambiguous-rank policy: a name or a positive int; else bad input."""
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


def grid_options(grid_settings: GridSettings) -> List[Tuple[str, object]]:
  """The settings of ``grid_settings`` off their defaults, as ``(name,
  value)`` pairs named ``grid_<field>`` (how the report and the run's
  fingerprint record them beside the solver's options)."""
  default = GridSettings()
  return [(f"grid_{name}", value)
          for name, value in grid_settings._asdict().items()
          if value != getattr(default, name)]
