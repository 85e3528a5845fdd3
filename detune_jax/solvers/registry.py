"""Named layer solvers, so that pipelines and binaries can pick one by name.

Every registered solver has the signature
``fn(W_primes, rank, *, steps, seed, **options) -> (W, Diagnostics)`` with
``W_primes`` of shape ``[n, d, k]`` or ``[L, n, d, k]``. :func:`solve` runs
one and then, on bfloat16/float16 releases, the dtype-aware grid step.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional

import jax.numpy as jnp

from detune_jax.solvers import closed_form as _cf
from detune_jax.solvers import grid as _grid
from detune_jax.solvers.baselines import mean_lora
from detune_jax.solvers.grid import GridDiagnostics, GridSettings
from detune_jax.solvers.schedule import RankSchedule
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


class SolveDiagnostics(NamedTuple):
  """What :func:`solve` did (a layer axis adds a leading ``L``).

  ``loss``, ``rank``, ``steps``, ``final_rank`` and ``final_loss`` read as
  in :class:`Diagnostics`; ``final_loss`` is the loss of the returned ``W``
  (the grid step's where its output was kept).

  Attributes:
    solver: the layer solver's own diagnostics (``Diagnostics``, or
      ``IntersectionDiagnostics`` of the closed form).
    grid: :class:`GridDiagnostics` of the dtype-aware grid step, or None
      where it did not run.
    grid_kept: bool, the grid step's output was kept (its
      ``consistent_fraction`` reached ``GridSettings.min_consistent``;
      elsewhere the layer keeps the solver's estimate), or None where the
      step did not run.
  """
  solver: Any
  grid: Optional[GridDiagnostics] = None
  grid_kept: Optional[jnp.ndarray] = None

  @property
  def loss(self):
    return self.solver.loss

  @property
  def rank(self):
    return self.solver.rank

  @property
  def steps(self):
    return self.solver.steps

  @property
  def final_rank(self):
    return self.solver.final_rank

  @property
  def final_loss(self):
    if self.grid is None:
      return self.solver.final_loss
    return jnp.where(self.grid_kept, self.grid.loss, self.solver.final_loss)


def solve(W_primes, rank, *, solver: str = "spectral_detuning",
          steps: int = 300, seed: int = 0, dtype_aware: Optional[bool] = None,
          input_dtype=None, grid: GridSettings = GridSettings(), **options):
  """Runs the solver registered as ``solver``, then the dtype-aware step.

  Args:
    W_primes: ``[n, d, k]`` or ``[L, n, d, k]``.
    rank: int or per-LoRA ints.
    solver: a name in :data:`SOLVERS`.
    steps: iteration budget of iterative solvers.
    seed: seed of random sketches.
    dtype_aware: the dtype-aware grid step after every solver but the
      ``mean_lora`` baseline: ``None`` on when the inputs are
      bfloat16/float16, ``False`` off, ``True`` required (a ValueError on
      other inputs).
    input_dtype: the release dtype when ``W_primes`` was upcast.
    grid: the grid step's :class:`GridSettings`.
    **options: options of the solver.

  Returns:
    ``(W, SolveDiagnostics)``.
  """
  if solver not in SOLVERS:
    raise ValueError(f"unknown solver {solver!r}; known: {sorted(SOLVERS)}")
  W, diag = SOLVERS[solver](W_primes, rank, steps=steps, seed=seed, **options)
  if not takes_grid_step(solver):
    return W, SolveDiagnostics(diag)
  return _dtype_aware(W_primes, W, diag, rank, seed, dtype_aware=dtype_aware,
                      input_dtype=input_dtype, grid=grid)


def takes_grid_step(solver: str) -> bool:
  """Whether :func:`solve` follows ``solver`` with the dtype-aware grid step
  on low-precision inputs: every solver but the ``mean_lora`` baseline."""
  return solver != "mean_lora"


def _dtype_aware(W_primes, W, diag, rank, seed, *, dtype_aware, input_dtype,
                 grid: GridSettings):
  """Grid refinement for low-precision inputs (see :mod:`grid`); ``(W,
  SolveDiagnostics)``.

  On when every input is bfloat16/float16 (``dtype_aware=None``), off with
  ``dtype_aware=False``. ``input_dtype`` names the release dtype when the
  caller has already upcast ``W_primes``.
  """
  low = _grid.low_precision_dtype(W_primes)
  if input_dtype is not None and low is None:
    low = jnp.dtype(input_dtype)
    if low not in _grid.LOW_PRECISION_DTYPES:
      low = None
    else:
      W_primes = jnp.asarray(W_primes).astype(low)
  if dtype_aware is False or low is None:
    if dtype_aware and low is None:
      raise ValueError("dtype_aware=True needs bfloat16/float16 inputs or "
                       "input_dtype=")
    return W, SolveDiagnostics(diag)
  W_grid, gdiag = _grid.grid_refine(W_primes, W, rank, seed=seed,
                                    **grid.refine_options())
  keep = gdiag.consistent_fraction >= float(grid.min_consistent)
  W = jnp.where(keep[..., None, None], W_grid, jnp.asarray(W, jnp.float32))
  return W, SolveDiagnostics(diag, gdiag, keep)


# --- Few fine-tunes: closed form, refinement, automatic choice. ---

# Refining a closed-form estimate starts at the end ranks: the paper's
# scheduler starts at rank 1, whose first M-step would throw the estimate away.
REFINE_SCHEDULE = RankSchedule(kind="fixed")

# "auto" refines a layer with spectral_detuning when its principal-angle gap
# (see IntersectionDiagnostics.gap) is below this: nearly shared subspaces.
AUTO_MIN_GAP = 0.05

# Steps of spectral_detuning (at the end ranks, then its float32 refinement)
# that "auto" takes from the closed form of every layer. Measured on the
# float32 stacks of docs/results.md, "Few fine-tunes" (real MiniLM
# fine-tunes, Gaussian and correlated synthetic LoRAs; the closed form, auto
# and 300 steps side by side in docs/results/few_finetunes/polish_*/), one
# step and the refinement gain 0.04 to 1.65 W-Error over the closed form on
# every one, while 300 steps drift away from it by float32 noise where the
# fine-tunes share directions (the loss is flat at the noise level there:
# lower or higher losses do not tell better estimates apart).
POLISH_STEPS = 1


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
