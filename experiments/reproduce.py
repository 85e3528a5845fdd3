r"""The paper's tables and figures on the shipped MiniLM bench.

    python -m experiments.reproduce [--out=reproduce] [--parts=...]

Recovers all-MiniLM-L6-v2 from its LoRA fine-tunes in
detune_jax/data/minilm_bench (see experiments.make_minilm_bench) and scores
LoRA-FT, Mean-LoRA, Spectral DeTuning (the paper's algorithm and scheduler,
300 steps) and auto (this project's default) by W-Error and SBERT distance to
the base on the built-in sentences. Parts (--parts):

  table    paper Table 2: mean ± std over --subsets random subsets of --n of
           the 15 rank-16 fine-tunes (float32 release); with the rank-
           scheduler ablation (paper Fig. 5 and 6: Spectral DeTuning without
           the scheduler on the same subsets).
  sweep    paper Fig. 7 and 10: W-Error and SBERT against n = --ns, the
           first n of one random order of the fine-tunes.
  bf16     Table 2 on the bfloat16 release of the base and the same fine-
           tunes (how most checkpoints ship; the bf16 base is then the
           truth), with the bit-exact share of the weights.
  mixed    Table 2 on the mixed subset (ranks 4 to 32, attention and MLP).

Writes OUT/results.json (every score), OUT/tables.md and the PNG plots, and
prints each part's wall time. Needs the demo extra (the base model) and
matplotlib.
"""

import time

_START = time.time()

import json  # pylint: disable=g-import-not-at-top,g-bad-import-order
import os
import sys

import jax
from absl import app, flags

from detune_jax import plots, timings
from detune_jax.eval import bench_study as study
from detune_jax.eval import evaluate
from detune_jax.io.errors import BadInputError, parse_flags
from detune_jax.lora import bench
from detune_jax.solvers.schedule import RankSchedule

PARTS = ("table", "sweep", "bf16", "mixed")
NO_SCHEDULER = "Spectral DeTuning, no scheduler"

_OUT = flags.DEFINE_string("out", "reproduce", "Output directory.")
_PARTS = flags.DEFINE_list("parts", list(PARTS), f"Parts to run, of {PARTS}.")
_SUBSETS = flags.DEFINE_integer("subsets", 10, "Random subsets per table.")
_N = flags.DEFINE_integer("n", 5, "Fine-tunes per subset in the tables.")
_NS = flags.DEFINE_list("ns", [str(n) for n in range(2, 16)],
                        "Numbers of fine-tunes of the sweep.")
_STEPS = flags.DEFINE_integer("steps", 300, "Iterative solvers' steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the subsets and solvers.")
_TEXTS = flags.DEFINE_string("texts", evaluate.DEFAULT_TEXTS, "Sentences of "
                             "the SBERT distance, one per line.")
_BENCH_DIR = flags.DEFINE_string(
    "bench_dir", os.path.dirname(bench.bench_dir()),
    "The bench (its rank16/ and mixed/ subsets).")


def _load(subset: str) -> study.Bench:
  d = os.path.join(_BENCH_DIR.value, subset)
  record = bench.read_bench(d)
  if record is None:
    raise BadInputError(d, f"no {bench.BENCH_JSON} (build it with "
                        "python -m experiments.make_minilm_bench)")
  return study.load_bench([os.path.join(d, a["name"])
                           for a in record["adapters"]], bench.base_dir())


def _table(b, scorer, extra=()):
  subsets = study.random_subsets(len(b.adapters), _N.value, _SUBSETS.value,
                                 _SEED.value)
  rows = study.score_subsets(b, scorer, subsets, steps=_STEPS.value,
                             seed=_SEED.value, extra=extra)
  return {"subsets": subsets, "rows": rows,
          "summary": study.summary(rows)}


def _part_table(b, scorer, out):
  res = _table(b, scorer, extra=[
      (NO_SCHEDULER, study.SPECTRAL_DETUNING, RankSchedule(kind="fixed"))])
  rows = res["rows"]
  sd, fixed = rows[study.SPECTRAL_DETUNING], rows[NO_SCHEDULER]
  short = [n.replace("encoder.layer.", "").replace(".weight", "")
           .replace("attention.", "") for n in b.names]
  mean_per_layer = lambda r: [sum(v) / len(v) for v in zip(*r)]
  plots.plot_per_layer(
      {"with the rank scheduler": mean_per_layer(sd["layer_w_error"]),
       "without": mean_per_layer(fixed["layer_w_error"])}, short,
      os.path.join(out, "fig5_scheduler_per_layer.png"),
      f"Spectral DeTuning per layer, mean over {_SUBSETS.value} subsets of "
      f"n={_N.value}")
  flat = lambda r: [x for layer in r["layer_w_error"] for x in layer]
  plots.plot_cumulative(
      {"with the rank scheduler": flat(sd), "without": flat(fixed),
       "Mean-LoRA": flat(rows[study.MEAN_LORA])},
      os.path.join(out, "fig6_scheduler_cumulative.png"),
      f"{len(b.names)} layers x {_SUBSETS.value} subsets, n={_N.value}")
  return res


def _part_sweep(b, scorer, out):
  import numpy as np  # pylint: disable=g-import-not-at-top
  order = [int(i) for i in np.random.default_rng(_SEED.value).permutation(
      len(b.adapters))]
  ns = [int(n) for n in _NS.value if int(n) <= len(b.adapters)]
  per_n = {}
  for n in ns:
    print(f" n={n}")
    rows = study.score_subsets(b, scorer, [sorted(order[:n])],
                               steps=_STEPS.value, seed=_SEED.value)
    per_n[n] = {m: {"w_error": r["w_error"][0], "sbert": r["sbert"][0],
                    "seconds": r["seconds"][0]} for m, r in rows.items()}
  panels = {k: {m: [per_n[n][m][k] for n in ns] for m in study.METHODS}
            for k in ("w_error", "sbert")}
  plots.plot_against_n(
      ns, {"W-Error (log10 MSE)": panels["w_error"],
           "SBERT distance (log10)": panels["sbert"]},
      os.path.join(out, "fig7_fig10_against_n.png"),
      "MiniLM rank-16 fine-tunes, the first n of one random order")
  return {"order": order, "ns": ns, "per_n": per_n}


def _sweep_table(res) -> str:
  lines = ["| n | " + " | ".join(f"{m} W-Error | {m} SBERT"
                                  for m in study.METHODS) + " |",
           "|---" * (1 + 2 * len(study.METHODS)) + "|"]
  for n in res["ns"]:
    r = res["per_n"][n]
    lines.append(f"| {n} | " + " | ".join(
        f"{r[m]['w_error']:.2f} | {r[m]['sbert']:.2f}"
        for m in study.METHODS) + " |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for p in _PARTS.value:
    if p not in PARTS:
      raise app.UsageError(f"--parts: unknown part {p!r} (known: {PARTS})")
  timings.enable_compilation_cache(None)
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  try:
    texts = evaluate.read_texts(_TEXTS.value)
    rank16 = _load("rank16")
    mixed = _load("mixed") if "mixed" in _PARTS.value else None
  except (BadInputError, ValueError) as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  scorer = study.Scorer(rank16, texts)
  results = {"settings": {"subsets": _SUBSETS.value, "n": _N.value,
                          "steps": _STEPS.value, "seed": _SEED.value,
                          "texts": len(texts)}}
  md = []
  for part in _PARTS.value:
    t0 = time.time()
    print(f"{part}:")
    if part == "table":
      res = _part_table(rank16, scorer, out)
      text = study.markdown_table(res["rows"])
    elif part == "sweep":
      res = _part_sweep(rank16, scorer, out)
      text = _sweep_table(res)
    elif part == "bf16":
      released = study.release(rank16, study.BF16)
      res = _table(released, study.Scorer(released, texts))
      text = study.markdown_table(res["rows"], bit_exact=True)
    else:
      res = _table(mixed, study.Scorer(mixed, texts))
      res["ranks"] = mixed.ranks.tolist()
      text = study.markdown_table(res["rows"])
    res["seconds"] = round(time.time() - t0, 1)
    results[part] = res
    md.append(f"## {part} ({res['seconds']:.0f} s)\n\n{text}\n")
    print(text)
    print(f"{part}: {res['seconds']:.1f}s")
    results["total_seconds"] = round(time.time() - _START, 1)
    _write(out, results, md)  # after every part: a crash keeps the others
    # Each part compiles its own programs (shapes, n); dropping the earlier
    # ones keeps a whole run's compiled code (and its memory maps) bounded.
    jax.clear_caches()
  print(f"results in {out}/; total time {results['total_seconds']:.1f}s")


def _write(out, results, md):
  for name, text in (("results.json", json.dumps(results, indent=1)),
                     ("tables.md", "\n".join(md))):
    path = os.path.join(out, name)
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
