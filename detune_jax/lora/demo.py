"""Recovering all-MiniLM-L6-v2 from fine-tunes of the shipped bench.

:func:`recover_minilm` merges adapters of the bench
(:mod:`~detune_jax.lora.bench`) into the base, recovers the base from the
merged models with :func:`detune_jax.pipeline.recover`, and scores the
fine-tunes, their mean (Mean-LoRA) and the recovery against the base:
W-Error over the fine-tuned matrices and SBERT distance on the built-in
sentences. :func:`format_table` prints the result.
"""

from __future__ import annotations

import os
import time
from typing import List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from detune_jax import metrics
from detune_jax.eval import evaluate, sbert
from detune_jax.io.safetensors_io import load_file, save_file
from detune_jax.lora import bench, tasks
from detune_jax.lora.train import encoder
from detune_jax.models import bert
from detune_jax.pipeline import RecoverConfig, recover

MODEL_FILE = "model.safetensors"


class Row(NamedTuple):
  """One method's scores against the base (lower is closer).

  Attributes:
    method: ``"LoRA-FT"`` (the mean over the fine-tunes of each one's
      score), ``"Mean-LoRA"`` or the recovery's solver.
    w_error: mean over the fine-tuned matrices of ``log10 MSE``.
    sbert_log10: mean over texts of ``log10(1 - cos + eps)``.
  """
  method: str
  w_error: float
  sbert_log10: float


class DemoResult(NamedTuple):
  """The rows, the recovery's report and where the models went."""
  rows: List[Row]
  report: dict
  work_dir: str
  seconds: float


def _sentence_embedder(model_dir: str, texts: Sequence[str]):
  """``embed(tensors) -> [texts, hidden]``: the base's sentence pipeline
  (mean pooling, L2 norm) as one jitted function of the weights, so every
  model is embedded by the same compiled program."""
  enc = encoder(bert.load(model_dir))
  data = tasks.pad(tasks.tokenize(model_dir, texts, max_length=256),
                   [0] * len(texts), max_length=256)
  ids, mask = jnp.asarray(data.ids), jnp.asarray(data.mask)

  @jax.jit
  def embed(tensors):
    hidden = enc.apply(tensors, ids, mask)
    m = mask[..., None].astype(jnp.float32)
    pooled = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return pooled / jnp.maximum(
        jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

  names = sorted(enc.tensors)
  return lambda tensors: np.asarray(embed({n: jnp.asarray(tensors[n])
                                           for n in names}))


def _merge_all(bench_dir: str, names: Sequence[str], models_dir: str,
               model_dir: str) -> List[str]:
  """The merged fine-tunes' directories (merged where not there yet)."""
  paths = []
  for name in names:
    out = os.path.join(models_dir, name)
    if not os.path.exists(os.path.join(out, MODEL_FILE)):
      bench.merged_model(os.path.join(bench_dir, name), out, model_dir)
    paths.append(out)
  return paths


def recover_minilm(bench_dir: str, work_dir: str, n: int = 5, *,
                   solver: str = "auto", steps: int = 300,
                   progress_bar: bool = True,
                   model_dir: Optional[str] = None) -> DemoResult:
  """Recovers the base from ``lora_00..`` of the bench and scores it.

  Args:
    bench_dir: the bench (``lora_XX/`` directories).
    work_dir: where the merged models (``models/``), Mean-LoRA
      (``mean_lora/``) and the recovery (``recovered/``) go; a recovery
      already there with the same inputs is resumed (or reread).
    n: fine-tunes to recover from (the first ``n``).
    solver: the pipeline's solver.
    steps: solver steps.
    progress_bar: show the pipeline's bar.
    model_dir: the base (default :func:`bench.base_dir`).

  Returns:
    A :class:`DemoResult`; ``rows`` are LoRA-FT, Mean-LoRA, the recovery.
  """
  t0 = time.time()
  model_dir = model_dir or bench.base_dir()
  names = [e.name for e in bench.plan(n)]
  models = _merge_all(bench_dir, names, os.path.join(work_dir, "models"),
                      model_dir)
  report = recover(RecoverConfig(
      models=tuple(models), output_dir=os.path.join(work_dir, "recovered"),
      ground_truth=model_dir, solver=solver, steps=steps),
                   progress_bar=progress_bar)

  base = load_file(os.path.join(model_dir, MODEL_FILE))
  fts = [load_file(os.path.join(m, MODEL_FILE)) for m in models]
  tuned = sorted(k for k in base
                 if any(not np.array_equal(f[k], base[k]) for f in fts))
  mean = {k: (np.mean([f[k] for f in fts], axis=0, dtype=np.float32)
              if k in tuned else v) for k, v in base.items()}
  mean_dir = os.path.join(work_dir, "mean_lora")
  if not os.path.exists(os.path.join(mean_dir, MODEL_FILE)):
    os.makedirs(mean_dir, exist_ok=True)
    save_file(mean, os.path.join(mean_dir, MODEL_FILE))
  recovered = load_file(os.path.join(work_dir, "recovered", MODEL_FILE))

  def w_error(tensors):
    return float(metrics.w_error({k: tensors[k] for k in tuned},
                                 {k: base[k] for k in tuned}))

  embed = _sentence_embedder(model_dir,
                             evaluate.read_texts(evaluate.DEFAULT_TEXTS))
  ref = embed(base)

  def distance(tensors):
    return sbert.sbert_distance(ref, embed(tensors)).mean_log10

  rows = [Row("LoRA-FT", float(np.mean([w_error(f) for f in fts])),
              float(np.mean([distance(f) for f in fts]))),
          Row("Mean-LoRA", w_error(mean), distance(mean)),
          Row(f"recovered ({report['solver']})", w_error(recovered),
              distance(recovered))]
  return DemoResult(rows, report, work_dir, time.time() - t0)


def format_table(rows: Sequence[Row]) -> str:
  """The rows as a text table.

  >>> print(format_table([Row("Mean-LoRA", -6.5, -3.25)]))
  method                 W-Error   SBERT (log10)
  Mean-LoRA                -6.50           -3.25
  """
  lines = [f"{'method':<20} {'W-Error':>9} {'SBERT (log10)':>15}"]
  lines += [f"{r.method:<20} {r.w_error:>9.2f} {r.sbert_log10:>15.2f}"
            for r in rows]
  return "\n".join(lines)

