r"""The minimum-n frontier: W-Error against the number of fine-tunes.

For n = 2..8 fine-tunes, compares Mean-LoRA, the paper's algorithm
(spectral_detuning, 300 steps), the closed form (subspace intersection,
n >= 3), the closed form refined by spectral_detuning, and the default
``auto`` solver (dtype-aware for low-precision releases), on

* ``gaussian``: synthetic Gaussian LoRAs (float32);
* ``correlated``: synthetic LoRAs whose factors share directions;
* ``gaussian_bf16`` / ``correlated_bf16``: those released in bfloat16;
* ``minilm`` / ``minilm_bf16``: real LoRA fine-tunes of all-MiniLM-L6-v2
  (the shipped bench's rank-16 adapters), merged in float32 or released in
  bfloat16.

Usage:

  python -m experiments.frontier --out=frontier \
      --scenarios=gaussian,correlated,gaussian_bf16,minilm,minilm_bf16

Writes ``frontier.json``, ``frontier.md`` (one table per scenario) and one
plot per scenario to ``--out``. The runs behind docs/results.md ("Few
fine-tunes", "Low-precision releases and bit-exact weights") are its
commands there, each with its own ``--out`` under docs/results/.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags
import jax.numpy as jnp
import numpy as np

import detune_jax as dj
from detune_jax import model_stacks
from detune_jax.solvers import grid
from detune_jax.solvers import registry
from detune_jax.synthetic import lora_stack

FLAGS = flags.FLAGS


def define_flags():
  """Flags of the binary (defined on run, so that imports never clash)."""
  flags.DEFINE_string("out", "frontier", "Output directory.")
  flags.DEFINE_list("scenarios", ["gaussian", "correlated", "gaussian_bf16",
                                  "minilm", "minilm_bf16"], "Scenarios to run.")
  flags.DEFINE_list("ns", ["2", "3", "4", "5", "6", "8"], "Numbers of fine-tunes.")
  flags.DEFINE_bool("tables_only", False, "Only re-render frontier.md and "
                    "the plots from an existing OUT/frontier.json.")
  flags.DEFINE_integer("dim", 384, "Synthetic layer size (dim x dim).")
  flags.DEFINE_integer("rank", 16, "LoRA rank.")
  flags.DEFINE_integer("layers", 2, "Synthetic layers per scenario.")
  flags.DEFINE_float("shared", 0.8, "Shared fraction of the correlated LoRAs.")
  flags.DEFINE_integer("steps", 300, "Steps of the iterative methods.")
  flags.DEFINE_list("methods", list(METHODS), "Methods to run.")
  flags.DEFINE_string("minilm_dir", model_stacks.MINILM_DIR,
                    "A folder of base/ and fine-tunes ft*/ (default: the shipped MiniLM bench's rank-16 adapters, merged there on first use).")


METHODS = ("mean_lora", "spectral_detuning", "closed_form",
           "closed_form+refine", "auto")
SCENARIOS = ("gaussian", "correlated", "gaussian_bf16", "correlated_bf16",
             "minilm", "minilm_bf16")


def scenario_stack(name: str, n: int, *, dim: int, rank: int, layers: int,
                   shared: float, minilm_dir: str):
  """``(W_true [L, d, k], W_primes [L, n, d, k])`` of a scenario: a
  synthetic stack of :func:`detune_jax.synthetic.lora_stack` (seed 0), or
  the real fine-tunes read by :func:`detune_jax.model_stacks.folder_stack`."""
  if name not in SCENARIOS:
    raise ValueError(f"unknown scenario {name!r}; expected one of "
                     f"{list(SCENARIOS)}")
  dtype = "bfloat16" if name.endswith("bf16") else "float32"
  if name.startswith("minilm"):
    return model_stacks.folder_stack(minilm_dir, n, dtype=dtype)
  return lora_stack(0, dim, dim, n, rank, layers=layers,
                    shared=shared if name.startswith("correlated") else 0.0,
                    dtype=dtype)


def run_method(method: str, W_primes, rank: int, steps: int):
  """``(W, seconds)`` or ``(None, reason)`` when the method does not apply."""
  low = grid.low_precision_dtype(W_primes) is not None
  opts = {}
  if method != "auto" and low:
    opts["dtype_aware"] = False  # the raw methods; "auto" is dtype-aware
  if method in ("closed_form", "closed_form+refine") and W_primes.shape[-3] < 3:
    return None, "n < 3"
  Wp = jnp.asarray(W_primes)
  t0 = time.perf_counter()
  W, _ = registry.solve(Wp, rank, solver=method, steps=steps, **opts)
  W = np.asarray(W)
  return W, time.perf_counter() - t0


def evaluate(W, W_true):
  out = {"w_error": float(dj.w_error(jnp.asarray(W), jnp.asarray(
      W_true, jnp.float32)))}
  if W_true.dtype != np.float32:
    out["bit_exact"] = float(dj.bit_exact_fraction(jnp.asarray(W),
                                                   jnp.asarray(W_true)))
  return out


def run_scenario(name: str, ns, *, dim: int, rank: int, layers: int,
                 shared: float, steps: int, minilm_dir: str, log=print,
                 methods=METHODS):
  """Rows ``{scenario, n, method, w_error, [bit_exact], seconds}``."""
  rows = []
  for n in ns:
    W_true, W_primes = scenario_stack(name, n, dim=dim, rank=rank,
                                      layers=layers, shared=shared,
                                      minilm_dir=minilm_dir)
    for method in methods:
      W, secs = run_method(method, W_primes, rank, steps)
      if W is None:
        continue
      row = dict(scenario=name, n=n, method=method, seconds=secs,
                 **evaluate(W, W_true))
      log(json.dumps(row))
      rows.append(row)
  return rows


def markdown(rows, scenario: str) -> str:
  """A table ``method x n`` of W-Error (and bit-exact %) for one scenario."""
  rows = [r for r in rows if r["scenario"] == scenario]
  ns = sorted({r["n"] for r in rows})
  lines = ["| method | " + " | ".join(f"n={n}" for n in ns) + " |",
           "|---|" + "---|" * len(ns)]
  for method in METHODS:
    if not any(r["method"] == method for r in rows):
      continue
    cells = []
    for n in ns:
      hit = [r for r in rows if r["n"] == n and r["method"] == method]
      if not hit:
        cells.append("—")
        continue
      cell = f"{hit[0]['w_error']:.2f}"
      if "bit_exact" in hit[0]:
        cell += f" ({100 * hit[0]['bit_exact']:.1f}%)"
      cells.append(cell)
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows, scenario: str, path: str):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for method in METHODS:
    pts = sorted((r["n"], r["w_error"]) for r in rows
                 if r["scenario"] == scenario and r["method"] == method)
    if pts:
      ax.plot(*zip(*pts), marker="o", label=method)
  ax.set_xlabel("number of fine-tunes n")
  ax.set_ylabel("W-Error (log10 MSE)")
  ax.set_title(scenario)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  unknown = sorted(set(FLAGS.methods) - set(METHODS))
  if unknown:
    raise app.UsageError(f"unknown --methods {unknown}; expected some of "
                         f"{list(METHODS)}")
  unknown = sorted(set(FLAGS.scenarios) - set(SCENARIOS))
  if unknown:
    raise app.UsageError(f"unknown --scenarios {unknown}; expected some of "
                         f"{list(SCENARIOS)}")
  os.makedirs(FLAGS.out, exist_ok=True)
  ns = [int(n) for n in FLAGS.ns]
  rows = []
  path = os.path.join(FLAGS.out, "frontier.json")
  if FLAGS.tables_only:
    with open(path) as f:
      rows = json.load(f)
    names = sorted({r["scenario"] for r in rows})
    for name in names:
      plot(rows, name, os.path.join(FLAGS.out, f"frontier_{name}.png"))
    with open(os.path.join(FLAGS.out, "frontier.md"), "w") as f:
      for name in names:
        f.write(f"### {name}\n\n{markdown(rows, name)}\n\n")
    print(f"wrote {FLAGS.out}/frontier.md")
    return
  for name in FLAGS.scenarios:
    rows += run_scenario(name, ns, dim=FLAGS.dim, rank=FLAGS.rank,
                         layers=FLAGS.layers, shared=FLAGS.shared,
                         steps=FLAGS.steps, minilm_dir=FLAGS.minilm_dir,
                         methods=FLAGS.methods)
    with open(path, "w") as f:
      json.dump(rows, f, indent=1)
    plot(rows, name, os.path.join(FLAGS.out, f"frontier_{name}.png"))
  with open(os.path.join(FLAGS.out, "frontier.md"), "w") as f:
    for name in FLAGS.scenarios:
      f.write(f"### {name}\n\n{markdown(rows, name)}\n\n")
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
