"""Recovering all-MiniLM-L6-v2 from fine-tunes of the shipped bench.

:func:`recover_minilm` merges adapters of the bench
(:mod:`~detune_jax.lora.bench`) into the base, recovers the base from the
merged models with :func:`detune_jax.pipeline.recover`, and scores the
fine-tunes, their mean (Mean-LoRA) and the recovery against the base as
:mod:`detune_jax.eval.bench_study` does: W-Error over the fine-tuned
matrices and SBERT distance on the built-in sentences. :func:`format_table`
prints the result.
"""

from __future__ import annotations

import os
import time
from typing import List, NamedTuple, Optional, Sequence

import numpy as np

from detune_jax.eval import bench_study as study
from detune_jax.eval import evaluate
from detune_jax.io.errors import BadInputError
from detune_jax.io.safetensors_io import load_file
from detune_jax.lora import bench
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


def recover_minilm(bench_dir: Optional[str], work_dir: str, n: int = 5, *,
                   solver: str = "auto", steps: int = 300,
                   progress_bar: bool = True,
                   model_dir: Optional[str] = None) -> DemoResult:
  """Recovers the base from the first ``n`` adapters of a bench subset and
  scores it.

  Args:
    bench_dir: a built subset of the bench (its ``bench.json`` lists the
      adapters; default the shipped ``rank16``).
    work_dir: where the merged models (``models/``) and the recovery
      (``recovered/``) go; a recovery already there with the same inputs
      is resumed (or reread).
    n: fine-tunes to recover from (the first ``n``).
    solver: the pipeline's solver.
    steps: solver steps.
    progress_bar: show the pipeline's bar.
    model_dir: the base (default :func:`bench.base_dir`).

  Returns:
    A :class:`DemoResult`; ``rows`` are LoRA-FT, Mean-LoRA, the recovery.

  Raises:
    BadInputError: no ``bench.json`` in ``bench_dir``, or bad adapters.
  """
  t0 = time.time()
  model_dir = model_dir or bench.base_dir()
  bench_dir = bench_dir or bench.bench_dir()
  record = bench.read_bench(bench_dir)
  if record is None:
    raise BadInputError(bench_dir, f"no {bench.BENCH_JSON}: not a built "
                        "subset of the bench")
  names = [a["name"] for a in record["adapters"]][:n]
  models = _merge_all(bench_dir, names, os.path.join(work_dir, "models"),
                      model_dir)
  report = recover(RecoverConfig(
      models=tuple(models), output_dir=os.path.join(work_dir, "recovered"),
      ground_truth=model_dir, solver=solver, steps=steps),
                   progress_bar=progress_bar)

  b = study.load_bench([os.path.join(bench_dir, a) for a in names],
                       model_dir)
  recovered = load_file(os.path.join(work_dir, "recovered", MODEL_FILE))
  scorer = study.Scorer(b, evaluate.read_texts(evaluate.DEFAULT_TEXTS))
  rows = study.score_subsets(b, scorer, [list(range(len(names)))],
                             [study.LORA_FT, study.MEAN_LORA],
                             log=lambda _: None)
  rows = [Row(m, r["w_error"][0], r["sbert"][0]) for m, r in rows.items()]
  layers = {k: recovered[k].astype(np.float32) for k in b.names}
  rows.append(Row(f"recovered ({report['solver']})", scorer.w_error(layers),
                  scorer.sbert(layers)))
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

