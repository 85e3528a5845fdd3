"""detune_jax: recover pre-fine-tuning weights from LoRA fine-tuned models.

>>> import detune_jax
>>> W, diag = detune_jax.spectral_detuning(W_primes, rank=16)   # doctest: +SKIP
"""

from detune_jax.metrics import detuning_loss, layer_w_errors, w_error
from detune_jax.solvers import (Diagnostics, RankEstimate, RankEstimationError,
                                RankSchedule, RankScheduleState,
                                estimate_rank, estimate_rank_details,
                                is_finetuned, lora_ft_w_error, mean_lora,
                                rank_schedule_init, rank_schedule_step,
                                spectral_detuning, truncated_svd)
from detune_jax.solvers import (GridDiagnostics, IntersectionDiagnostics,
                                NotIdentifiableError, bit_exact_fraction,
                                grid_refine, interval_estimate, round_to_grid,
                                rounding_interval,
                                subspace_intersection_detuning)
from detune_jax.solvers.registry import SOLVERS, solve

__version__ = "0.1.0"
