r"""A defender's audit: how many of these fine-tunes can I publish?

A publisher who holds the base model and plans to release LoRA fine-tunes of
it asks how well an attacker recovers the base from every number of released
models. For n = 2..N (the first n models, in the given order, or several
random subsets of size n), every fine-tuned layer is recovered with each
solver (Mean-LoRA, Spectral DeTuning, the closed form, ``auto``), scored
against the true base, and the best solver per layer counts (the attacker
may use any of them). The base *leaks* at the smallest n whose overall W-Error
is at or below the threshold.

Usage:

  python -m experiments.audit --base=BASE_DIR --models=A,B,C,D \
      --out=/tmp/audit [--threshold=-10] [--rank=16] [--subsets=1]

Writes ``audit.json`` (per n, per layer and per solver; strict JSON, a
non-finite figure is ``null``), ``audit.png`` and prints a table. Inputs are
read as stored (a bf16 release is solved as bf16, with the dtype-aware
refinement), or with ``--release_dtype=bfloat16`` (or ``float16``) each
rounded to that dtype first, as saving them in it would: a publisher who
holds float32 weights and plans to ship them in bf16 audits what ships.
With ``--from_rounded_base`` the fine-tunes are instead rebuilt on the base
as rounded (``round(round(W) + W'_i - W)``), as fine-tunes made from a base
published in that dtype are: then the base lies on the grid of the
releases and the attacker's grid step applies. For low-precision releases the audit also gives the share of
the base's weights that come back bit for bit (per solver, and for the best
solver of each layer). The reader and checks are those of
``experiments.recover``: HF
directories (sharded ones too) or single ``.safetensors`` files; the LoRA
layers are the float tensors of 2+ axes that differ among the models (conv
kernels and 3-D tensors are solved as ``[d, prod(rest)]`` matrices). Bad
input (fewer than 2 models, missing, pickle, truncated or corrupt files,
mismatched names, shapes or dtypes, non-finite values, a rank too large for a
layer, ``--out`` an existing file) ends with exit status 2 and one line
``error: FILE: tensor 'NAME': what is wrong``.
"""

from __future__ import annotations

import logging as py_logging
import math
import os
import random
import sys
import time

from absl import app, flags
import jax.numpy as jnp
import numpy as np

import detune_jax as dj
from detune_jax.io.errors import BadInputError, parse_flags
from detune_jax import timings
from detune_jax.io.progress import write_json_atomic
from detune_jax.solvers import grid
from detune_jax.solvers import registry
from experiments import stacks

FLAGS = flags.FLAGS


def define_flags():
  """Flags of the binary (defined on run, so that imports never clash)."""
  flags.DEFINE_string("base", None, "The base model (HF dir or .safetensors).")
  flags.DEFINE_list("models", None, "The fine-tunes to be released, in order.")
  flags.DEFINE_string("out", None, "Output directory (default: no files).")
  flags.DEFINE_float("threshold", None, "Leak threshold on the W-Error; "
                     "default: 3 decades below the released models' own "
                     "W-Error (LoRA-FT), i.e. 1000x closer to the base.")
  flags.DEFINE_integer("rank", 16, "LoRA rank the attacker assumes.")
  flags.DEFINE_integer("steps", 300, "Steps of the iterative solvers.")
  flags.DEFINE_integer("subsets", 1, "Subsets of each size n (1: the first n).")
  flags.DEFINE_list("solvers", ["mean_lora", "spectral_detuning", "closed_form",
                                "auto"], "Solvers the attacker may use.")
  flags.DEFINE_integer("seed", 0, "Seed of the subsets and solvers.")
  flags.DEFINE_enum("release_dtype", "stored", list(RELEASE_DTYPES),
                    "Audit the models as stored, or each (base and "
                    "fine-tunes) rounded to this dtype, as saving it in this "
                    "dtype would.")
  flags.DEFINE_bool("from_rounded_base", False, "With --release_dtype: "
                    "rebuild each fine-tune on the base as rounded "
                    "(round(round(W) + W'_i - W)), as fine-tunes made from a "
                    "base published in that dtype are.")


DEFAULT_MARGIN = 3.0
# "stored": as the files hold them; else the release dtype they are rounded
# to (experiments.stacks.release).
RELEASE_DTYPES = ("stored", "bfloat16", "float16")


def _subsets(num_models: int, n: int, count: int, seed: int):
  if count <= 1:
    return [tuple(range(n))]
  rng = random.Random(seed * 1000 + n)
  seen = {tuple(range(n))}
  for _ in range(20 * count):
    if len(seen) >= count:
      break
    seen.add(tuple(sorted(rng.sample(range(num_models), n))))
  return sorted(seen)


def audit(base: str, models, *, rank: int = 16, steps: int = 300,
          subsets: int = 1, solvers=("mean_lora", "spectral_detuning",
                                     "closed_form", "auto"),
          threshold=None, seed: int = 0, release_dtype: str = "stored",
          from_rounded_base: bool = False, log=print):
  """Recovery of ``base`` from every number of the ``models``.

  Args:
    base: path of the base model.
    models: paths of the fine-tunes, in release order.
    rank: LoRA rank the attacker assumes.
    steps: iterations of the iterative solvers.
    subsets: subsets per n (1: the first n models).
    solvers: registry names the attacker may use.
    threshold: W-Error at or below which the base counts as leaked; default
      :data:`DEFAULT_MARGIN` decades below the released models' own W-Error.
    seed: seed of subsets and solvers.
    release_dtype: ``"stored"`` (the files as they are), or ``"bfloat16"``
      / ``"float16"``: base and fine-tunes each rounded to that dtype.
    from_rounded_base: with a ``release_dtype``, the fine-tunes rebuilt on
      the rounded base instead (:func:`experiments.stacks.release` with
      ``rebase``).
    log: progress printer.

  Returns:
    A dict: ``layers`` (names), ``lora_ft`` (released models' W-Error),
    ``threshold``, ``release_dtype``, ``low_precision`` (the audited
    weights are bf16/fp16), ``per_n`` (a list of ``{n, subset, overall,
    per_layer, per_solver, best_solver, seconds}``, and for low-precision
    releases ``bit_exact``, the share of the base's weights that the best
    solver of each layer recovers bit for bit, and ``bit_exact_per_solver``),
    ``leak_n`` (smallest n at or below the threshold, or None) and
    ``layer_leak_n``.

  Raises:
    BadInputError: bad settings or input files (see the module docstring).
  """
  models = [str(m) for m in models]
  unknown = [s for s in solvers if s not in registry.SOLVERS]
  if unknown or not solvers:
    raise BadInputError("--solvers", f"unknown solver(s) {unknown}; known: "
                        f"{sorted(registry.SOLVERS)}")
  for flag, value in (("--steps", steps), ("--subsets", subsets)):
    if value < 1:
      raise BadInputError(flag, f"must be >= 1, got {value}")
  if release_dtype not in RELEASE_DTYPES:
    raise BadInputError("--release_dtype", f"must be one of {RELEASE_DTYPES}, "
                        f"got {release_dtype!r}")
  groups = stacks.real_stacks(base, models, dtype=release_dtype, rank=rank,
                              rebase=from_rounded_base)
  low = any(grid.low_precision_dtype(Wp) is not None
            for _, _, Wp in groups.values())
  layer_names = [nm for g in groups.values() for nm in g[0]]
  W_true = {}
  lora_ft = []
  for group, W, Wp in groups.values():
    for l, nm in enumerate(group):
      W_true[nm] = W[l]
      lora_ft.append(float(dj.lora_ft_w_error(jnp.asarray(Wp[l], jnp.float32),
                                              jnp.asarray(W[l], jnp.float32))))
  lora_ft_mean = float(np.mean(lora_ft))
  weights = sum(W.size for _, W, _ in groups.values())
  if threshold is None:
    threshold = lora_ft_mean - DEFAULT_MARGIN
  per_n = []
  for n in range(2, len(models) + 1):
    for subset in _subsets(len(models), n, subsets, seed):
      t0 = time.perf_counter()
      errs, exact = {}, {}
      for solver in solvers:
        errs[solver], exact[solver] = {}, {}
        for group, W, Wp in groups.values():
          try:
            Wr, _ = registry.solve(jnp.asarray(Wp[:, list(subset)]), rank,
                                   solver=solver, steps=steps, seed=seed)
          except ValueError as e:  # e.g. the closed form at n = 2
            log(f"n={n} {solver}: skipped ({str(e).split(':')[0]})")
            errs.pop(solver)
            break
          e_l = dj.layer_w_errors(Wr, jnp.asarray(W, jnp.float32))
          errs[solver].update(zip(group, [float(x) for x in e_l]))
          if low:  # matching weights per layer (rounded as released)
            same = grid.bit_exact_mask(Wr, jnp.asarray(W)).sum(axis=(-2, -1))
            exact[solver].update(zip(group, [int(x) for x in same]))
      if not errs:
        log(f"n={n} subset={list(subset)}: no solver applies")
        continue
      per_layer = {nm: min(errs[s][nm] for s in errs) for nm in layer_names}
      best = {nm: min(errs, key=lambda s, nm=nm: errs[s][nm])
              for nm in layer_names}
      row = dict(n=n, subset=list(subset),
                 overall=float(np.mean(list(per_layer.values()))),
                 per_layer=per_layer, best_solver=best,
                 per_solver={s: float(np.mean(list(v.values())))
                             for s, v in errs.items()},
                 seconds=time.perf_counter() - t0)
      if low:
        row["bit_exact"] = sum(exact[best[nm]][nm]
                               for nm in layer_names) / weights
        row["bit_exact_per_solver"] = {s: sum(exact[s].values()) / weights
                                       for s in errs}
      log(f"n={n} subset={list(subset)} overall={row['overall']:.2f} " +
          " ".join(f"{s}={v:.2f}" for s, v in row["per_solver"].items()) +
          (f" bit-exact={100 * row['bit_exact']:.1f}%" if low else ""))
      per_n.append(row)
  worst = {}
  for row in per_n:  # over subsets of one size, the worst case for the defender
    worst[row["n"]] = min(worst.get(row["n"], np.inf), row["overall"])
  leak_n = next((n for n in sorted(worst) if worst[n] <= threshold), None)
  layer_leak_n = {}
  for nm in layer_names:
    layer_leak_n[nm] = next((row["n"] for row in sorted(per_n,
                                                        key=lambda r: r["n"])
                             if row["per_layer"][nm] <= threshold), None)
  return dict(layers=layer_names, lora_ft=lora_ft_mean, threshold=threshold,
              per_n=per_n, leak_n=leak_n, layer_leak_n=layer_leak_n,
              models=models, base=base, release_dtype=release_dtype,
              from_rounded_base=from_rounded_base, low_precision=low)


def table(result) -> str:
  """Markdown table: n, overall best W-Error, per solver, leaked? For a
  low-precision release the W-Errors carry the bit-exact share in
  brackets."""
  solvers = sorted({s for r in result["per_n"] for s in r["per_solver"]})

  def cell(r, err, key, s=None):
    exact = r.get(key) if s is None else r.get(key, {}).get(s)
    return f"{err:.2f}" + ("" if exact is None else
                           f" ({100 * exact:.1f}%)")

  lines = ["| n | subset | best W-Error | " + " | ".join(solvers) +
           " | leaked |", "|---|---|---|" + "---|" * len(solvers) + "---|"]
  for r in result["per_n"]:
    cells = [cell(r, r["per_solver"][s], "bit_exact_per_solver", s)
             if s in r["per_solver"] else "—" for s in solvers]
    leaked = "yes" if r["overall"] <= result["threshold"] else "no"
    lines.append(f"| {r['n']} | {r['subset']} | "
                 f"{cell(r, r['overall'], 'bit_exact')} | " +
                 " | ".join(cells) + f" | {leaked} |")
  return "\n".join(lines)


def _strict(obj):
  """``obj`` with every non-finite float replaced by None (strict JSON)."""
  if isinstance(obj, dict):
    return {k: _strict(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_strict(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  if isinstance(obj, np.integer):
    return int(obj)
  return obj


def write_json(result, out_dir: str) -> str:
  """Writes ``out_dir/audit.json`` (strict JSON: a non-finite figure is
  ``null``) atomically; returns its path."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "audit.json")
  write_json_atomic(path, _strict(result))
  return path


def plot(result, path: str):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  rows = result["per_n"]
  for nm in result["layers"]:
    pts = sorted((r["n"], r["per_layer"][nm]) for r in rows)
    ax.plot(*zip(*pts), color="0.75", lw=0.7)
  pts = sorted((r["n"], r["overall"]) for r in rows)
  ax.plot(*zip(*pts), "o-", color="C3", lw=2, label="best solver (mean)")
  ax.axhline(result["threshold"], ls="--", color="k", lw=1,
             label=f"leak threshold {result['threshold']:.1f}")
  ax.axhline(result["lora_ft"], ls=":", color="C0", lw=1,
             label=f"released models {result['lora_ft']:.1f}")
  ax.set_xlabel("number of released fine-tunes n")
  ax.set_ylabel("W-Error of the recovered base")
  ax.set_title("how well the base leaks (grey: layers)")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # JAX logs its backend search at INFO; bad input must stay one line.
  py_logging.getLogger("jax").setLevel(py_logging.WARNING)
  # As recover: a second audit of the same shapes loads its programs.
  timings.enable_compilation_cache()
  try:
    if not FLAGS.base:
      raise BadInputError("--base", "is required")
    if FLAGS.out and os.path.exists(FLAGS.out) and not os.path.isdir(
        FLAGS.out):
      raise BadInputError(FLAGS.out, "output path exists and is not a "
                          "directory")
    result = audit(FLAGS.base, FLAGS.models or [], rank=FLAGS.rank,
                   steps=FLAGS.steps, subsets=FLAGS.subsets,
                   solvers=FLAGS.solvers, threshold=FLAGS.threshold,
                   seed=FLAGS.seed, release_dtype=FLAGS.release_dtype,
                   from_rounded_base=FLAGS.from_rounded_base)
  except BadInputError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.stderr.flush()
    sys.exit(2)
  print(table(result))
  leak = result["leak_n"]
  print(f"released models' own W-Error (LoRA-FT): {result['lora_ft']:.2f}; "
        f"threshold {result['threshold']:.2f}")
  print("the base leaks from n = " + str(leak) if leak else
        f"the base does not leak with up to {len(FLAGS.models)} models")
  if result["low_precision"]:
    print("in brackets: the share of the base's weights recovered bit for "
          "bit" + ("" if FLAGS.release_dtype == "stored" else
                   f" from the {FLAGS.release_dtype} release"))
  if FLAGS.out:
    try:
      write_json(result, FLAGS.out)
      plot(result, os.path.join(FLAGS.out, "audit.png"))
    except OSError as e:
      sys.stderr.write(f"error: {FLAGS.out}: cannot write the results "
                       f"({e.strerror or e})\n")
      sys.exit(2)
    print(f"wrote {FLAGS.out}/audit.json and audit.png")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
