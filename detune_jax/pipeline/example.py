"""The embedded example: a real recovery of synthetic LoRA fine-tunes."""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Sequence

import numpy as np

from detune_jax.pipeline.config import RecoverConfig
from detune_jax.pipeline.run import recover


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
