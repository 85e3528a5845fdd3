"""A defender's audit: how well the base leaks from n released fine-tunes.

A publisher who holds the base model and plans to release LoRA fine-tunes of
it asks how well an attacker recovers the base from every number of released
models. For n = 2..N (the first n models, in the given order, or several
random subsets of size n), every fine-tuned layer is recovered with each
solver (Mean-LoRA, Spectral DeTuning, the closed form, ``auto``), scored
against the true base, and the best solver per layer counts (the attacker
may use any of them). The base *leaks* at the smallest n whose overall
W-Error is at or below the threshold. ``python -m experiments.audit`` runs
it on models on disk.
"""

from __future__ import annotations

import math
import os
import random
import time
from typing import Dict, List, NamedTuple, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from detune_jax import metrics
from detune_jax.io.errors import BadInputError
from detune_jax.io.progress import write_json_atomic
from detune_jax.model_stacks import layer_stacks
from detune_jax.solvers import baselines
from detune_jax.solvers import grid
from detune_jax.solvers import registry

__all__ = ["audit", "table", "write_json", "plot", "model_subsets",
           "DEFAULT_MARGIN", "DEFAULT_SOLVERS", "RELEASE_DTYPES"]

# Decades below the released models' own W-Error (LoRA-FT) at which the
# base counts as leaked by default: 1000x closer to the base than they are.
DEFAULT_MARGIN = 3.0
DEFAULT_SOLVERS = ("mean_lora", "spectral_detuning", "closed_form", "auto")
# "stored": as the files hold them; else the release dtype they are rounded
# to (detune_jax.synthetic.release).
RELEASE_DTYPES = ("stored", "bfloat16", "float16")


class _Layers(NamedTuple):
  """The audited layers: ``groups`` of :func:`layer_stacks`, their
  ``names``, whether they are ``low`` precision, the released models'
  W-Error ``lora_ft`` (mean over layers) and the number of ``weights``."""
  groups: Dict[Tuple[int, int], Tuple[List[str], np.ndarray, np.ndarray]]
  names: List[str]
  low: bool
  lora_ft: float
  weights: int


def model_subsets(num_models: int, n: int, count: int, seed: int):
  """``count`` subsets of size ``n`` of ``range(num_models)``, sorted, the
  first ``n`` models among them (``count`` <= 1: only those); seeded."""
  if count <= 1:
    return [tuple(range(n))]
  rng = random.Random(seed * 1000 + n)
  seen = {tuple(range(n))}
  for _ in range(20 * count):
    if len(seen) >= count:
      break
    seen.add(tuple(sorted(rng.sample(range(num_models), n))))
  return sorted(seen)


def _check_settings(solvers, steps: int, subset_count: int,
                    release_dtype: str) -> None:
  unknown = [s for s in solvers if s not in registry.SOLVERS]
  if unknown or not solvers:
    raise BadInputError("--solvers", f"unknown solver(s) {unknown}; known: "
                        f"{sorted(registry.SOLVERS)}")
  for flag, value in (("--steps", steps), ("--subsets", subset_count)):
    if value < 1:
      raise BadInputError(flag, f"must be >= 1, got {value}")
  if release_dtype not in RELEASE_DTYPES:
    raise BadInputError("--release_dtype", f"must be one of {RELEASE_DTYPES}, "
                        f"got {release_dtype!r}")


def _read_layers(base: str, models: Sequence[str], rank: int,
                 release_dtype: str, from_rounded_base: bool) -> _Layers:
  groups = layer_stacks(base, models, dtype=release_dtype, rank=rank,
                        rebase=from_rounded_base)
  low = any(grid.low_precision_dtype(Wp) is not None
            for _, _, Wp in groups.values())
  names = [nm for g in groups.values() for nm in g[0]]
  lora_ft = [float(baselines.lora_ft_w_error(
      jnp.asarray(Wp[l], jnp.float32), jnp.asarray(W[l], jnp.float32)))
             for _, W, Wp in groups.values() for l in range(len(W))]
  weights = sum(W.size for _, W, _ in groups.values())
  return _Layers(groups, names, low, float(np.mean(lora_ft)), weights)


def _solve_subset(layers: _Layers, subset, solvers, rank: int, steps: int,
                  seed: int, log):
  """``(errs, exact)``: per solver that applies, ``{layer: W-Error}`` and,
  for low-precision layers, ``{layer: weights recovered bit for bit}``."""
  errs, exact = {}, {}
  for solver in solvers:
    errs[solver], exact[solver] = {}, {}
    for group, W, Wp in layers.groups.values():
      try:
        Wr, _ = registry.solve(jnp.asarray(Wp[:, list(subset)]), rank,
                               solver=solver, steps=steps, seed=seed)
      except ValueError as e:  # e.g. the closed form at n = 2
        log(f"n={len(subset)} {solver}: skipped ({str(e).split(':')[0]})")
        errs.pop(solver)
        break
      e_l = metrics.layer_w_errors(Wr, jnp.asarray(W, jnp.float32))
      errs[solver].update(zip(group, [float(x) for x in e_l]))
      if layers.low:  # matching weights per layer (rounded as released)
        same = grid.bit_exact_mask(Wr, jnp.asarray(W)).sum(axis=(-2, -1))
        exact[solver].update(zip(group, [int(x) for x in same]))
  return errs, exact


def _subset_row(layers: _Layers, subset, errs, exact, seconds: float) -> dict:
  """One row of ``per_n``: the best solver per layer and the means."""
  names = layers.names
  per_layer = {nm: min(errs[s][nm] for s in errs) for nm in names}
  best = {nm: min(errs, key=lambda s, nm=nm: errs[s][nm]) for nm in names}
  row = dict(n=len(subset), subset=list(subset),
             overall=float(np.mean(list(per_layer.values()))),
             per_layer=per_layer, best_solver=best,
             per_solver={s: float(np.mean(list(v.values())))
                         for s, v in errs.items()},
             seconds=seconds)
  if layers.low:
    row["bit_exact"] = sum(exact[best[nm]][nm] for nm in names) / layers.weights
    row["bit_exact_per_solver"] = {s: sum(exact[s].values()) / layers.weights
                                   for s in errs}
  return row


def _leaks(per_n, names, threshold: float):
  """``(leak_n, layer_leak_n)``: the smallest n whose worst subset is at or
  below ``threshold``, and per layer the smallest n of a row that is."""
  worst = {}
  for row in per_n:  # over subsets of one size, the worst case for the defender
    worst[row["n"]] = min(worst.get(row["n"], np.inf), row["overall"])
  leak_n = next((n for n in sorted(worst) if worst[n] <= threshold), None)
  by_n = sorted(per_n, key=lambda r: r["n"])
  layer_leak_n = {nm: next((row["n"] for row in by_n
                            if row["per_layer"][nm] <= threshold), None)
                  for nm in names}
  return leak_n, layer_leak_n


def audit(base: str, models, *, rank: int = 16, steps: int = 300,
          subsets: int = 1, solvers=DEFAULT_SOLVERS, threshold=None,
          seed: int = 0, release_dtype: str = "stored",
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
      the rounded base instead (:func:`detune_jax.synthetic.release` with
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
    BadInputError: bad settings, or input files that recover refuses
      (:func:`detune_jax.model_stacks.open_models`).
  """
  models = [str(m) for m in models]
  _check_settings(solvers, steps, subsets, release_dtype)
  layers = _read_layers(base, models, rank, release_dtype, from_rounded_base)
  if threshold is None:
    threshold = layers.lora_ft - DEFAULT_MARGIN
  per_n = []
  for n in range(2, len(models) + 1):
    for subset in model_subsets(len(models), n, subsets, seed):
      t0 = time.perf_counter()
      errs, exact = _solve_subset(layers, subset, solvers, rank, steps, seed,
                                  log)
      if not errs:
        log(f"n={n} subset={list(subset)}: no solver applies")
        continue
      row = _subset_row(layers, subset, errs, exact, time.perf_counter() - t0)
      log(f"n={n} subset={list(subset)} overall={row['overall']:.2f} " +
          " ".join(f"{s}={v:.2f}" for s, v in row["per_solver"].items()) +
          (f" bit-exact={100 * row['bit_exact']:.1f}%" if layers.low else ""))
      per_n.append(row)
  leak_n, layer_leak_n = _leaks(per_n, layers.names, threshold)
  return dict(layers=layers.names, lora_ft=layers.lora_ft,
              threshold=threshold, per_n=per_n, leak_n=leak_n,
              layer_leak_n=layer_leak_n, models=models, base=base,
              release_dtype=release_dtype,
              from_rounded_base=from_rounded_base, low_precision=layers.low)


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


def plot(result, path: str) -> None:
  """The recovered base's W-Error against n (each layer, and the mean of
  the best solvers), with the leak threshold, as a PNG at ``path``."""
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
