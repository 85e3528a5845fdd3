"""Opening a recovery's inputs and output directory: the checks that read
files, and the run's fingerprint."""

from __future__ import annotations

import os
import tempfile
from typing import NamedTuple, Optional

from detune_jax.io.errors import BadInputError
from detune_jax.io.lowra import LowraBench
from detune_jax.io.models import (ModelFiles, check_distinct_paths,
                                  check_same_tensors)
from detune_jax.io.progress import (CHECKPOINT_DIR, PARTS_DIR, RUN_FILE,
                                    fingerprint, read_json)
from detune_jax.pipeline.config import (FORMAT_VERSION, PLAN_FILE,
                                        REPORT_FILE, RecoverConfig,
                                        check_config, grid_options)


class Inputs(NamedTuple):
  """The opened inputs of a recovery.

  Attributes:
    models: the fine-tuned models (:class:`detune_jax.io.ModelFiles`, or
      LoWRA Bench's).
    ground_truth: the true base model, or None.
    identity: what identifies the input files (for the fingerprint).
    lowra: the :class:`LowraBench` read, or None.
  """
  models: list
  ground_truth: object
  identity: dict
  lowra: Optional[LowraBench]


def open_inputs(config: RecoverConfig) -> Inputs:
  """Opens and checks the models (or LoWRA Bench) and the ground truth.

  Raises:
    BadInputError: bad settings (:func:`check_config`), fewer than 2
      models, missing/corrupt/pickle files, tensors that differ in name,
      shape or dtype.
  """
  check_config(config)
  if config.lowra_bench:
    if config.models or config.ground_truth:
      raise BadInputError("--lowra_bench", "takes neither --models nor "
                          "--ground_truth (the pre-FT weights are in the "
                          "parquet files)")
    n = len(config.lora_ids) or config.n_loras
    if n < 2:
      raise BadInputError("--n_loras", f"need at least 2 models, got {n}")
    bench = LowraBench(config.lowra_bench, config.subset,
                       lora_ids=config.lora_ids, n_loras=config.n_loras)
    return Inputs(bench.models, bench.ground_truth,
                  {"lowra": bench.identity()}, bench)
  if len(config.models) < 2:
    raise BadInputError(config.models[0] if config.models else "--models",
                        f"need at least 2 fine-tuned models, got "
                        f"{len(config.models)}")
  models = [ModelFiles(p) for p in config.models]
  check_distinct_paths(models)
  check_same_tensors(models)
  gt = None
  if config.ground_truth:
    gt = ModelFiles(config.ground_truth)
  identity = {"models": [m.identity() for m in models],
              "ground_truth": gt.identity() if gt else None}
  return Inputs(models, gt, identity, None)


def run_fingerprint(config: RecoverConfig, inputs: Inputs) -> str:
  """Fingerprint of everything that changes the output files."""
  return fingerprint({
      "format": FORMAT_VERSION, "inputs": inputs.identity,
      "rank": str(config.rank), "steps": config.steps, "seed": config.seed,
      "solver": config.solver,
      "solver_options": (list(config.solver_options)
                         + grid_options(config.grid)),
      "dtype_aware": config.dtype_aware, "max_memory_gb": config.max_memory_gb,
      "ambiguous_rank": str(config.ambiguous_rank),
      "max_rank": config.max_rank,
      # Only when on, so that earlier runs keep their fingerprint.
      **({"explain_steps": config.explain_steps}
         if config.explain_steps else {})})


def check_writable(out_dir: str):
  """Checks, writing nothing that stays, that ``out_dir`` can be created (or,
  when it exists, written): a directory is made and removed in it or in its
  nearest existing ancestor.

  Raises:
    BadInputError: an ancestor is a file, or the place is not writable.
  """
  existing = out_dir
  while not os.path.lexists(existing):
    parent = os.path.dirname(existing)
    if parent == existing:
      break
    existing = parent
  if not os.path.isdir(existing):
    what = ("output path exists and is not a directory" if existing == out_dir
            else f"cannot create the output directory: {existing} is not a "
            "directory")
    raise BadInputError(out_dir, what)
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".detune_write_test_", dir=existing))
  except OSError as e:
    raise BadInputError(out_dir, f"cannot write the output directory "
                        f"({e.strerror or e} in {existing})")


def check_output_dir(out_dir: str, fp: str) -> Optional[dict]:
  """Checks that ``out_dir`` is empty, new, or holds this very run.

  Returns:
    The finished report when this run already completed there, else None.

  Raises:
    BadInputError: the directory holds a different run.
  """
  if not os.path.exists(out_dir):
    return None
  if not os.path.isdir(out_dir):
    raise BadInputError(out_dir, "output path exists and is not a directory")
  run_path = os.path.join(out_dir, RUN_FILE)
  if os.path.exists(run_path):
    run = read_json(run_path)
    if not isinstance(run, dict):
      raise BadInputError(run_path, "not the run file of a recovery (not a "
                          "JSON object); use a new --output_dir")
    if run.get("fingerprint") != fp:
      raise BadInputError(out_dir, "output directory holds a different run "
                          "(other inputs or flags); use a new --output_dir")
  else:
    # Without run.json nothing here is this run's: refuse every name a run
    # writes rather than overwrite it.
    for f in (REPORT_FILE, "model.safetensors", "model.safetensors.index.json",
              CHECKPOINT_DIR, PLAN_FILE, PARTS_DIR):
      if os.path.lexists(os.path.join(out_dir, f)):
        raise BadInputError(out_dir, f"output directory holds {f} of another "
                            "run; use a new --output_dir")
    return None
  report = read_json(os.path.join(out_dir, REPORT_FILE))
  if (isinstance(report, dict) and report.get("fingerprint") == fp
      and report.get("complete")
      and all(os.path.exists(os.path.join(out_dir, f))
              for f in report.get("output_files", []))):
    return report
  return None
