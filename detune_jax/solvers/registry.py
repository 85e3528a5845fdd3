"""Named layer solvers, so that pipelines and binaries can pick one by name.

Every registered solver has the signature
``fn(W_primes, rank, *, steps, seed, **options) -> (W, Diagnostics)`` with
``W_primes`` of shape ``[n, d, k]`` or ``[L, n, d, k]``.
"""

from __future__ import annotations

from typing import Callable, Dict

from absl import logging
import jax.numpy as jnp
import numpy as np

from detune_jax.solvers.baselines import mean_lora
from detune_jax.solvers.spectral_detuning import Diagnostics, spectral_detuning

SOLVERS: Dict[str, Callable] = {}


def register_solver(name: str):
  """Decorator adding ``fn`` to :data:`SOLVERS` under ``name``."""
  def wrap(fn):
    SOLVERS[name] = fn
    return fn
  return wrap


@register_solver("spectral_detuning")
def _spectral_detuning(W_primes, rank, *, steps=300, seed=0, **options):
  return spectral_detuning(W_primes, rank, steps, seed=seed, **options)


@register_solver("mean_lora")
def _mean_lora(W_primes, rank, *, steps=300, seed=0, **options):
  del rank, steps, seed, options
  W_primes = jnp.asarray(W_primes)
  lead, n = W_primes.shape[:-3], W_primes.shape[-3]
  zeros = jnp.zeros(lead, jnp.float32)
  return mean_lora(W_primes), Diagnostics(
      loss=zeros[..., None], rank=jnp.zeros(lead + (1, n), jnp.int32),
      steps=jnp.zeros(lead, jnp.int32), final_rank=jnp.zeros(lead + (n,), jnp.int32),
      final_loss=zeros)


def solve(W_primes, rank, *, solver: str = "spectral_detuning", steps: int = 300,
          seed: int = 0, **options):
  """Runs the solver registered as ``solver``, then the dtype-aware step.

  Args:
    W_primes: ``[n, d, k]`` or ``[L, n, d, k]``.
    rank: int or per-LoRA ints.
    solver: a name in :data:`SOLVERS`.
    steps: iteration budget of iterative solvers.
    seed: seed of random sketches.
    **options: solver options, plus the dtype-aware options shared by every
      solver but the ``mean_lora`` baseline: ``dtype_aware`` (``None``: on
      when the inputs are bfloat16/float16; ``False``: off; ``True``: required),
      ``input_dtype`` (the release dtype when ``W_primes`` was upcast),
      ``grid_steps`` (default :data:`GRID_STEPS`), ``grid_restarts``
      (default :data:`GRID_RESTARTS`), ``grid_redecode_steps`` (default
      :data:`GRID_REDECODE_STEPS`; 0: off),
      ``grid_snap_from``, ``grid_shrink``, ``grid_momentum`` and
      ``grid_free_steps`` (``grid_refine``'s ``snap_from``, ``shrink``,
      ``momentum`` and ``free_steps``; see
      :func:`detune_jax.solvers.grid.grid_refine`), and
      ``grid_min_consistent`` (default :data:`GRID_MIN_CONSISTENT`: layers
      whose grid step ends less consistent than that keep the solver's
      estimate; 0: never).

  Returns:
    ``(W, diagnostics)``.
  """
  if solver not in SOLVERS:
    raise ValueError(f"unknown solver {solver!r}; known: {sorted(SOLVERS)}")
  grid_opts = _pop_grid_options(options)
  W, diag = SOLVERS[solver](W_primes, rank, steps=steps, seed=seed, **options)
  if not takes_grid_step(solver):
    return W, diag
  return _dtype_aware(W_primes, W, diag, rank, grid_opts, seed)


def takes_grid_step(solver: str) -> bool:
  """Whether :func:`solve` follows ``solver`` with the dtype-aware grid step
  on low-precision inputs: every solver but the ``mean_lora`` baseline."""
  return solver != "mean_lora"


# --- Few fine-tunes: closed form, refinement, automatic choice. ---

from detune_jax.solvers import closed_form as _cf  # noqa: E402
from detune_jax.solvers import grid as _grid  # noqa: E402
from detune_jax.solvers.schedule import RankSchedule  # noqa: E402

# Refining a closed-form estimate starts at the end ranks: the paper's
# scheduler starts at rank 1, whose first M-step would throw the estimate away.
REFINE_SCHEDULE = RankSchedule(kind="fixed")

# "auto" refines a layer with spectral_detuning when its principal-angle gap
# (see IntersectionDiagnostics.gap) is below this: nearly shared subspaces.
AUTO_MIN_GAP = 0.05

# Steps of spectral_detuning (at the end ranks, then its float32 refinement)
# that "auto" takes from the closed form of every layer. Measured on five
# scenarios (docs/results.md, "Polishing the closed form"), one step and the
# refinement gain 0.04 to 1.65 W-Error over the closed form on every float32
# one, while 300 steps drift away from it by float32 noise where the
# fine-tunes share directions (the loss is flat at the noise level there:
# lower or higher losses do not tell better estimates apart).
POLISH_STEPS = 1

# Restarts of the dtype-aware grid step (grid_refine's ``restarts``). One
# restart: bit-exact weights of real MiniLM fine-tunes released in bf16 96.4%
# -> 96.6% (n=3) and 97.7% -> 97.8% (n=5), against 96.7% / 97.8% for the
# grid step started from the true base; `auto` takes about 1.3x to 1.9x as
# long (docs/results.md, "Bit-exact weights of bf16 releases"). A small
# gain, kept: the most weights back is what the tool is for. With the
# projections' momentum: 97.42% -> 97.44% on the MiniLM fine-tunes, none at
# 1024x1024 r=8, for 1.2x to 1.5x the time (docs/results.md, "Momentum in
# the grid step's projections").
GRID_RESTARTS = 1

# Alternations of the grid step per round. 1000 gained 0.12 points of
# bit-exact weights on real MiniLM fine-tunes released in bf16 (n=3) for 5.0x
# the time of `auto` (docs/results.md, "A longer grid alternation"); with
# momentum, 0.004 points for about 3x ("Momentum in the grid step's
# projections").
GRID_STEPS = 100

# Projections of the grid step's re-reading of the entries in doubt
# (grid_refine's ``redecode_steps``; 0: off). With the grid step's momentum,
# bf16 releases, n=3: bit-exact weights 98.71% -> 99.23% at 1024x1024 r=8
# (the share the true updates determine: 99.01%) and 96.84% -> 97.44% on
# real MiniLM fine-tunes (r=16), for 2x to 3x the time (docs/results.md,
# "Momentum in the grid step's projections"; without momentum it gained
# 0.02 on MiniLM, "Re-reading the entries in doubt"). The most weights back
# is what the tool is for.
GRID_REDECODE_STEPS = 300

# The grid step assumes that the base lies on the release dtype's grid and
# that each release rounds it plus a low-rank update. Where that is false,
# e.g. fine-tunes of a float32 base each rounded to bf16 on its own (the
# released base rounded on its own too), its output is worse than its input:
# real MiniLM fine-tunes, n=3, W-Error against the float32 base -8.36 for
# the closed form and -7.81 after the grid step. The step's share of entries
# whose grid value lies in the intersection of the rounding intervals
# (GridDiagnostics.consistent_fraction) tells the two apart: 0.91 to 0.98
# where the model holds, 0.10 to 0.38 where it does not (bf16 and fp16,
# n = 3 to 8, synthetic and real MiniLM layers; docs/results.md, "Releases
# not rounded from a base on the grid"). A layer below this keeps the
# solver's estimate. With two releases the step ends at 0.55 to 0.58 either
# way and is skipped too; it gained nothing there (at most 0.1 points of
# bit-exact weights and 0.01 W-Error).
GRID_MIN_CONSISTENT = 0.75


def _dtype_aware(W_primes, W, diag, rank, options, seed):
  """Grid refinement for low-precision inputs (see :mod:`grid`).

  On when every input is bfloat16/float16 (``dtype_aware=None``), off with
  ``dtype_aware=False``. ``input_dtype`` names the release dtype when the
  caller has already upcast ``W_primes``.
  """
  flag = options.pop("dtype_aware", None)
  input_dtype = options.pop("input_dtype", None)
  grid_steps = options.pop("grid_steps", GRID_STEPS)
  grid_restarts = options.pop("grid_restarts", GRID_RESTARTS)
  grid_redecode = options.pop("grid_redecode_steps", GRID_REDECODE_STEPS)
  # Left to grid_refine's own defaults unless given.
  tuning = {name: options.pop("grid_" + name)
            for name in ("snap_from", "shrink", "momentum", "free_steps")
            if "grid_" + name in options}
  low = _grid.low_precision_dtype(W_primes)
  if input_dtype is not None and low is None:
    low = jnp.dtype(input_dtype)
    if low not in _grid.LOW_PRECISION_DTYPES:
      low = None
    else:
      W_primes = jnp.asarray(W_primes).astype(low)
  if flag is False or low is None:
    if flag and low is None:
      raise ValueError("dtype_aware=True needs bfloat16/float16 inputs or "
                       "input_dtype=")
    return W, diag
  min_consistent = float(options.pop("grid_min_consistent",
                                     GRID_MIN_CONSISTENT))
  W_grid, gdiag = _grid.grid_refine(W_primes, W, rank, steps=grid_steps,
                                    seed=seed, restarts=grid_restarts,
                                    redecode_steps=grid_redecode, **tuning)
  keep = gdiag.consistent_fraction >= min_consistent
  off = np.asarray(~keep)
  if off.any():
    logging.warning(
        "grid step skipped on %d of %d layers: it ends with the releases "
        "not consistent with a base on the %s grid (consistent fraction "
        "%.2f < %.2f; e.g. fine-tunes of a float32 base each rounded on its "
        "own, or two releases, which do not pin the base); those layers "
        "keep the solver's estimate", off.sum(), off.size, low,
        float(np.min(np.asarray(gdiag.consistent_fraction))), min_consistent)
  W = jnp.where(keep[..., None, None], W_grid, jnp.asarray(W, jnp.float32))
  return W, diag._replace(final_loss=jnp.where(keep, gdiag.loss,
                                               diag.final_loss))


# Options of the dtype-aware step that every solver but mean_lora takes.
GRID_OPTIONS = ("dtype_aware", "input_dtype", "grid_steps", "grid_restarts",
                "grid_snap_from", "grid_shrink", "grid_redecode_steps",
                "grid_momentum", "grid_free_steps", "grid_min_consistent")


def _pop_grid_options(options):
  return {k: options.pop(k) for k in GRID_OPTIONS if k in options}


@register_solver("closed_form")
def _closed_form(W_primes, rank, *, steps=300, seed=0, **options):
  """Subspace-intersection closed form (n >= 3)."""
  del steps
  return _cf.subspace_intersection_detuning(W_primes, rank, seed=seed,
                                            **options)


@register_solver("closed_form+refine")
def _closed_form_refine(W_primes, rank, *, steps=300, seed=0, **options):
  """Closed form as ``init`` of spectral_detuning."""
  cf_opts = {k: options.pop(k) for k in ("oversample", "niter")
             if k in options}
  W0, diag0 = _cf.subspace_intersection_detuning(W_primes, rank, seed=seed,
                                                 **cf_opts)
  options.setdefault("schedule", REFINE_SCHEDULE)
  return spectral_detuning(W_primes, rank, steps, seed=seed, init=W0,
                           **options)


def _take(x, idx):
  return jnp.asarray(x)[jnp.asarray(idx)]


@register_solver("auto")
def _auto(W_primes, rank, *, steps=300, seed=0, **options):
  """Chooses per layer.

  * ``n < 3`` (or ranks too large for the closed form): spectral_detuning.
  * otherwise the closed form, polished by :data:`POLISH_STEPS` step of
    spectral_detuning from it at the end ranks and the solver's float32
    refinement (one-shot accuracy at the cost of a few passes over the
    stack); layers whose principal-angle gap is below :data:`AUTO_MIN_GAP`
    (nearly shared subspaces: the closed form is then noise-sensitive) are
    also refined by ``steps`` steps from the closed form, kept where they
    end at a lower loss of Eq. 3 than the polished estimate;
  * low-precision inputs then go through the dtype-aware grid refinement
    (in :func:`solve`, as for every solver).
  """
  min_gap = options.pop("min_gap", AUTO_MIN_GAP)
  W_primes = jnp.asarray(W_primes)
  n, d, k = W_primes.shape[-3:]
  ranks = rank if not isinstance(rank, int) else (rank,) * n
  try:
    _cf.check_identifiable(n, tuple(int(r) for r in ranks), d, k)
  except _cf.NotIdentifiableError:
    return spectral_detuning(W_primes, rank, steps, seed=seed, **options)
  W_cf, cdiag = _cf.subspace_intersection_detuning(W_primes, rank, seed=seed)
  options.setdefault("schedule", REFINE_SCHEDULE)
  # The stack is read again after the polishing step: never donate it.
  options.pop("donate_input", None)
  W, diag = spectral_detuning(W_primes, rank, POLISH_STEPS, seed=seed,
                              init=W_cf, **options)
  gaps = jnp.min(cdiag.gap, axis=-1)
  if W_primes.ndim == 3:
    if float(gaps) < min_gap:
      Wr, rdiag = spectral_detuning(W_primes, rank, steps, seed=seed,
                                    init=W_cf, **options)
      if float(rdiag.final_loss) < float(diag.final_loss):
        W, diag = Wr, rdiag
    return W, diag
  bad = [i for i, g in enumerate(gaps.tolist()) if g < min_gap]
  if bad:
    Wr, rdiag = spectral_detuning(_take(W_primes, bad), rank, steps,
                                  seed=seed, init=_take(W_cf, bad), **options)
    idx = jnp.asarray(bad)
    better = rdiag.final_loss < diag.final_loss[idx]
    W = W.at[idx].set(jnp.where(better[:, None, None], Wr, W[idx]))
    # Refined layers report the refinement's steps and final loss; the loss
    # and rank curves keep the polishing step's (one entry per layer).
    diag = diag._replace(
        steps=diag.steps.at[idx].set(jnp.where(better, rdiag.steps,
                                               diag.steps[idx])),
        final_loss=diag.final_loss.at[idx].set(
            jnp.where(better, rdiag.final_loss, diag.final_loss[idx])))
  return W, diag
