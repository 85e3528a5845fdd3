"""Solvers: pure functions on stacks of fine-tuned matrices."""

from detune_jax.solvers.baselines import lora_ft_w_error, mean_lora
from detune_jax.solvers.detection import is_finetuned
from detune_jax.solvers.lowrank import truncated_svd
from detune_jax.solvers.rank_estimation import (RankEstimate,
                                                RankEstimationError,
                                                estimate_rank,
                                                estimate_rank_details)
from detune_jax.solvers.schedule import (RankSchedule, RankScheduleState,
                                         rank_schedule_init, rank_schedule_step)
from detune_jax.solvers.spectral_detuning import (Diagnostics, precompile,
                                                  spectral_detuning)
from detune_jax.solvers.closed_form import (IntersectionDiagnostics,
                                            NotIdentifiableError,
                                            subspace_intersection_detuning)
from detune_jax.solvers.grid import (GridDiagnostics, GridSettings,
                                     bit_exact_fraction, grid_refine,
                                     interval_estimate, round_to_grid,
                                     rounding_interval)
from detune_jax.solvers.grid_diagnostics import (Explanation,
                                                 explain_releases,
                                                 first_order_margin)
