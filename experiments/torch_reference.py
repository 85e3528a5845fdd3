"""Benchmark-only baseline: Spectral DeTuning in PyTorch as the paper states it.

Written from the paper (Horwitz et al. 2024, "Recovering the Pre-Fine-Tuning
Weights of Generative Models"): Algorithm 2 of Appendix H (the PyTorch
pseudocode with the rank scheduler) and the scheduler of Appendix E, Table 9
(start rank 1, factor 2, patience 15, end rank forced after 50% of the steps;
"increase on plateau", i.e. PyTorch's ``ReduceLROnPlateau`` turned around, here
with ``threshold=0`` like :class:`detune_jax.RankSchedule`). It is not the
authors' code and is not used by the library: it exists so that
``experiments/bench_solver.py`` can time the published method on the same
inputs. Per layer and step it does exactly what Algorithm 2 does: form the n
residuals ``W'_i - W``, take ``torch.svd_lowrank(M_i, q=current_rank)`` with
its default ``niter``, rebuild ``M_i``, take the mean of ``W'_i - M_i`` and the
loss ``mean_i mean((W'_i - (W + M_i))^2)``, and step the scheduler.

torch is an optional dependency (``pip install .[reference]``).
:func:`recover_models` recovers whole models the way the official script
does; ``python -m experiments.reference_torch`` runs it as a process of its
own, which ``experiments.bench_recover`` times from its start.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch


class IncreaseRankOnPlateau:
  """The rank scheduler of Table 9 (paper App. E).

  The working rank starts at ``start_rank``; when the loss has not improved
  (``loss < best * (1 - threshold)``) for more than ``patience`` consecutive
  steps it is multiplied by ``factor`` (capped at ``end_rank``); from scheduler
  step ``total_steps * (1 - force_end_rank_percent)`` on it is ``end_rank``.
  """

  def __init__(self, total_steps: int, end_rank: int, start_rank: int = 1,
               factor: int = 2, patience: int = 15, threshold: float = 0.0,
               force_end_rank_percent: float = 0.5):
    self.rank = min(start_rank, end_rank)
    self.end_rank = end_rank
    self.factor = factor
    self.patience = patience
    self.threshold = threshold
    self.force_at = total_steps - total_steps * force_end_rank_percent
    self.best = math.inf
    self.bad_steps = 0
    self.steps_seen = 0

  def step(self, loss: float) -> int:
    """Observes the loss of one optimisation step; returns the next rank."""
    self.steps_seen += 1
    if self.steps_seen >= self.force_at:
      self.rank = self.end_rank
      return self.rank
    if loss < self.best * (1.0 - self.threshold):
      self.best = loss
      self.bad_steps = 0
    else:
      self.bad_steps += 1
    if self.bad_steps > self.patience:
      self.rank = min(self.rank * self.factor, self.end_rank)
      self.bad_steps = 0
    return self.rank


@torch.no_grad()
def spectral_detuning(W_primes, rank: int, steps: int = 300, *,
                      callback: Optional[Callable[[int, torch.Tensor], None]] = None):
  """Algorithm 2 of the paper for one layer.

  Args:
    W_primes: ``[n, d, k]`` float32 tensor (or a list of n ``[d, k]``).
    rank: the LoRA rank (the scheduler's end rank).
    steps: optimisation steps (paper: 300 for ViT and SD).
    callback: optional ``callback(step, W)`` after every step (e.g. to record
      the W-Error); the time it takes is not counted in ``seconds``.

  Returns:
    ``(W, losses, ranks, seconds)``: the recovery, the per-step loss and
    working rank (lists), and the wall seconds of the algorithm itself.
  """
  W_ps = list(W_primes)
  scheduler = IncreaseRankOnPlateau(steps, rank)
  current_rank = scheduler.rank
  losses, ranks = [], []
  seconds = 0.0
  start = time.perf_counter()
  W_s = torch.mean(torch.stack(W_ps), dim=0)
  for step in range(steps):
    # M-step (Eq. 5): truncate each residual with a randomized low-rank SVD.
    M_s = [W_p - W_s for W_p in W_ps]
    for i in range(len(M_s)):
      U, S, V = torch.svd_lowrank(M_s[i], q=current_rank)
      M_s[i] = (U @ torch.diag_embed(S)) @ V.T
    # W-step (Eq. 7).
    W_s = torch.mean(torch.stack([W_p - M for W_p, M in zip(W_ps, M_s)]), dim=0)
    # Loss (Eq. 3) and the scheduler.
    loss = torch.mean(torch.stack(
        [torch.mean((W_p - (W_s + M)) ** 2) for W_p, M in zip(W_ps, M_s)]))
    loss = float(loss)
    losses.append(loss)
    ranks.append(current_rank)
    current_rank = scheduler.step(loss)
    if callback is not None:
      seconds += time.perf_counter() - start
      callback(step, W_s)
      start = time.perf_counter()
  seconds += time.perf_counter() - start
  return W_s, losses, ranks, seconds


def _load(path: str):
  """All tensors of a safetensors file or of an HF directory's shards."""
  import glob  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  files = ([path] if path.endswith(".safetensors") else
           sorted(glob.glob(os.path.join(path, "*.safetensors"))))
  tensors = {}
  for f in files:
    tensors.update(load_file(f))
  return tensors


def recover_models(models, rank: int, steps: int, output: str, seed: int = 0,
                   ground_truth: Optional[str] = None):
  """The paper's algorithm over whole models, as the official script runs it:
  a layer at a time (every 2-D float tensor that differs among the models),
  ``steps`` steps each; the recovered layers are saved to ``output``. With
  ``ground_truth`` every step also prints its loss and W-Error, as the
  official ``spectral_detuning.py`` does. (That script also reads its
  dataset again for every layer; here each model is read once, so this
  runs faster than it.)"""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  loaded = [_load(m) for m in models]
  truth = _load(ground_truth) if ground_truth else None
  out = {}
  for name, first in loaded[0].items():
    if first.ndim != 2 or not first.is_floating_point():
      continue
    if all(torch.equal(first, other[name]) for other in loaded[1:]):
      continue
    stack = torch.stack([m[name].float() for m in loaded])
    callback = None
    if truth is not None:
      W_pre = truth[name].float()

      def callback(step, W, W_pre=W_pre, name=name):
        gt_error = torch.mean((W - W_pre) ** 2).item()
        print(f"{name} iter {step} | GT Error: {gt_error}")
    out[name] = spectral_detuning(stack, rank, steps,
                                  callback=callback)[0].contiguous()
  save_file(out, output)
  return len(out)
