"""detune_jax: recover pre-fine-tuning weights from LoRA fine-tuned models.

>>> import detune_jax
>>> W, diag = detune_jax.spectral_detuning(W_primes, rank=16)   # doctest: +SKIP
"""

import os as _os

# XLA:CPU's concurrency-optimized HLO scheduler: with it on, the batched
# solver programs deadlocked more often (1 hang in 10 runs of one 640x768
# SD-shaped solve, 4 of 4 runs of the SD benchmark; 0 in 10 with it off).
# The deadlocks come from two batched LAPACK calls running side by side,
# which the solvers now order (lowrank.after; tests/test_lapack_order.py
# checks every program); the flag stays as a second line of defence. Off
# unless the user set it; only effective before the XLA backend starts.
_XLA_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "xla_cpu_enable_concurrency_optimized_scheduler" not in _os.environ.get(
    "XLA_FLAGS", ""):
  _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + " "
                              + _XLA_SCHEDULER_FLAG).strip()

from detune_jax.metrics import detuning_loss, layer_w_errors, w_error
from detune_jax.solvers import (Diagnostics, RankEstimate, RankEstimationError,
                                RankSchedule, RankScheduleState,
                                estimate_rank, estimate_rank_details,
                                is_finetuned, lora_ft_w_error, mean_lora,
                                precompile,
                                rank_schedule_init, rank_schedule_step,
                                spectral_detuning, truncated_svd)
from detune_jax.solvers import (Explanation, GridDiagnostics, GridSettings,
                                IntersectionDiagnostics, NotIdentifiableError,
                                bit_exact_fraction, explain_releases,
                                first_order_margin, grid_refine,
                                interval_estimate, round_to_grid,
                                rounding_interval,
                                subspace_intersection_detuning)
from detune_jax.solvers.registry import SOLVERS, SolveDiagnostics, solve
from detune_jax.timings import enable_compilation_cache

__version__ = "0.1.0"

__all__ = [
    # Solving: one entry point, and the solvers it dispatches to.
    "SOLVERS", "solve", "spectral_detuning", "subspace_intersection_detuning",
    "mean_lora", "grid_refine", "precompile", "enable_compilation_cache",
    # Their settings and diagnostics.
    "RankSchedule", "RankScheduleState", "rank_schedule_init",
    "rank_schedule_step", "GridSettings", "Diagnostics",
    "IntersectionDiagnostics", "GridDiagnostics", "SolveDiagnostics",
    "NotIdentifiableError",
    # Ranks and fine-tuned layers.
    "estimate_rank", "estimate_rank_details", "RankEstimate",
    "RankEstimationError", "is_finetuned", "truncated_svd",
    # Metrics.
    "w_error", "layer_w_errors", "detuning_loss", "lora_ft_w_error",
    "bit_exact_fraction",
    # Low-precision releases.
    "explain_releases", "Explanation", "first_order_margin",
    "interval_estimate", "round_to_grid", "rounding_interval",
]
