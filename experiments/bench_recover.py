r"""Whole-model recovery, wall clock from process start: detune_jax against
the paper's algorithm run the way the official script runs it.

On real MiniLM fine-tunes (by default the shipped bench's rank-16 adapters,
merged: 24 attention layers of 384x384), each run is a fresh process, timed from its
start to its exit:

* ``reference``: ``experiments.reference_torch`` (torch, a layer at a time,
  ``--steps`` steps each, printing each step's loss and W-Error, as
  ``spectral_detuning.py`` of the official code does; it reads each model
  once, where the official script reads its dataset again for every layer);
* ``recover cold``: ``experiments.recover`` (default solver) with an empty
  JAX compilation cache, as on a user's first run;
* ``recover warm``: the same again, its programs in the cache.

* ``official``, with ``--official_dir`` (a clone of
  eliahuhorwitz/Spectral-DeTuning and its requirements: torch, datasets,
  pytorch-lightning): the official ``spectral_detuning.py`` itself, unmodified,
  on CPU, on the same fine-tunes written in the LoWRA Bench layout
  (``experiments.lowra_export``). It runs twice; the second run, its
  dataset cache built, is the one compared.

It prints each run's speed-up (the official script's wall time, else the
torch reference's, over the run's), the W-Error (mean and worst layer) of
every output against the base, and where each recover run's time went (its
report's ``timings``; ``startup`` is the wall time less the run's own
``seconds``: interpreter, imports, flags).

  python -m experiments.bench_recover --n=5 [--official_dir=Spectral-DeTuning]

Needs the ``reference`` extra (torch) and the fine-tunes.
"""

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from safetensors.numpy import load_file

from detune_jax import metrics, model_stacks
from detune_jax.io.lowra_writer import write_lowra_bench

flags.DEFINE_string("minilm_dir", model_stacks.MINILM_DIR,
                    "A folder of base/ and fine-tunes ft*/ (default: the shipped MiniLM bench's rank-16 adapters, merged there on first use).")
flags.DEFINE_integer("n", 5, "Number of fine-tunes (the first n).")
flags.DEFINE_integer("rank", 16, "LoRA rank given to both.")
flags.DEFINE_integer("steps", 300, "Steps per layer for both.")
flags.DEFINE_string("solver", None, "recover's --solver (default: its "
                    "default).")
flags.DEFINE_bool("reference", True, "Run the torch reference.")
flags.DEFINE_integer("repeats", 3, "Cold and warm recover runs (medians).")
flags.DEFINE_string("recover_pythonpath", None, "PYTHONPATH of the recover "
                    "runs: another checkout's recover (e.g. a git worktree "
                    "of an older commit) to compare with.")
flags.DEFINE_string("official_dir", None, "A clone of the official code "
                    "(eliahuhorwitz/Spectral-DeTuning): run its script too.")
FLAGS = flags.FLAGS

PHASES = ("startup", "open", "scan", "read", "compile", "solve", "evaluate",
          "write")


def _run(cmd, env=None, cwd=None, output=False):
  start = time.perf_counter()
  proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True,
                        check=False)
  wall = time.perf_counter() - start
  if proc.returncode:
    sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
  return (wall, proc.stdout) if output else wall


def _official(models, base_dir, work):
  """Wall seconds and per-layer final W-Errors of the official script."""
  data = os.path.join(work, "lowra")
  try:
    write_lowra_bench(base_dir, models, FLAGS.rank, data)
  except ValueError as e:  # an update of rank above --rank
    sys.exit(str(e))
  cmd = [sys.executable, "spectral_detuning.py", "--subset=vit",
         f"--dataset={data}", f"--cache_dir={os.path.join(work, 'hf_cache')}",
         f"--output_path={os.path.join(work, 'official')}", "--start_layer=0",
         "--n_layers_to_recover=-1", f"--n_loras={len(models)}",
         "--lora_ids", *[str(i) for i in range(len(models))],
         f"--n_iters={FLAGS.steps}", f"--sched_end_rank={FLAGS.rank}",
         "--device=cpu"]
  first = _run(cmd, cwd=FLAGS.official_dir)
  wall, out = _run(cmd, cwd=FLAGS.official_dir, output=True)
  last = re.findall(rf"Iter {FLAGS.steps - 1} \| .*GT Error: ([0-9.e+-]+)",
                    out)
  errs = {f"layer {i}": math.log10(float(e)) for i, e in enumerate(last)}
  return wall, first, errs


def _errors(path, base):
  """Per-layer W-Error of the recovered tensors in ``path`` (a safetensors
  file) against the base model's tensors of the same names."""
  got = load_file(path)
  errs = {}
  for name, W in got.items():
    if name in base and W.ndim == 2 and not np.array_equal(W, base[name]):
      errs[name] = float(metrics.layer_w_error(W, base[name]))
  return errs


def main(argv):
  del argv
  try:
    base_dir, models = model_stacks.folder_models(FLAGS.minilm_dir, FLAGS.n)
  except FileNotFoundError as e:
    sys.exit(str(e))
  base = load_file(os.path.join(base_dir, "model.safetensors"))
  work = tempfile.mkdtemp(prefix="bench_recover_")
  py = sys.executable
  common = [f"--models={','.join(models)}", f"--rank={FLAGS.rank}",
            f"--steps={FLAGS.steps}"]
  rows = {}
  if FLAGS.official_dir:
    wall, first, errs = _official(models, base_dir, work)
    rows["official script"] = (wall, errs, None)
    print(f"official script: {first:.1f} s on its first run (building its "
          f"dataset cache), {wall:.1f} s on the second")
  if FLAGS.reference:
    out = os.path.join(work, "reference.safetensors")
    wall = _run([py, "-m", "experiments.reference_torch", *common,
                 f"--output={out}", f"--ground_truth={base_dir}"])
    rows["reference (torch)"] = (wall, _errors(out, base), None)
  solver = [f"--solver={FLAGS.solver}"] if FLAGS.solver else []
  runs = {"recover cold": [], "recover warm": []}
  for r in range(FLAGS.repeats):
    # A fresh compilation cache per repeat: its first run is a user's first
    # run, the second one a later run of the same shapes.
    env = dict(os.environ,
               JAX_COMPILATION_CACHE_DIR=os.path.join(work, f"jax_cache_{r}"))
    if FLAGS.recover_pythonpath:
      env["PYTHONPATH"] = FLAGS.recover_pythonpath
    for label in runs:
      out_dir = os.path.join(work, f"{label.replace(' ', '_')}_{r}")
      # (python -m puts the working directory first on the path.)
      wall = _run([py, "-m", "experiments.recover", *common, *solver,
                   f"--output_dir={out_dir}"], env=env,
                  cwd=FLAGS.recover_pythonpath)
      with open(os.path.join(out_dir, "report.json")) as f:
        report = json.load(f)
      t = dict(report.get("timings", {}))
      t["startup"] = wall - report["seconds"]
      runs[label].append((wall, out_dir, t))
  for label, rs in runs.items():
    # The run of median wall time, with its own breakdown.
    wall, out_dir, t = sorted(rs)[len(rs) // 2]
    rows[label] = (wall, _errors(os.path.join(out_dir, "model.safetensors"),
                                 base), t)
    print(f"{label}: runs " + ", ".join(f"{w:.2f}" for w, _, _ in rs) + " s")
  print(f"MiniLM, {len(base)} tensors, n={FLAGS.n}, rank {FLAGS.rank}, "
        f"{FLAGS.steps} steps; wall clock from process start (recover: the "
        f"median of {FLAGS.repeats} runs)")
  ref_wall = rows.get("official script",
                      rows.get("reference (torch)", (None,)))[0]
  print(f"{'':20s} {'wall s':>8s} {'speed-up':>9s} {'layers':>6s} "
        f"{'W-Error mean':>12s} {'worst':>7s}")
  for label, (wall, errs, _) in rows.items():
    e = np.array(list(errs.values()))
    ratio = f"{ref_wall / wall:8.1f}x" if ref_wall else f"{'':9s}"
    print(f"{label:20s} {wall:8.1f} {ratio} {len(e):6d} {e.mean():12.2f} "
          f"{e.max():7.2f}")
  print("where recover's time goes (s):")
  print(f"{'':20s}" + "".join(f"{p:>9s}" for p in PHASES))
  for label, (wall, _, t) in rows.items():
    if t is not None:
      print(f"{label:20s}" + "".join(
          f"{t[p]:9.1f}" if p in t else f"{'n/a':>9s}" for p in PHASES))


if __name__ == "__main__":
  app.run(main)
