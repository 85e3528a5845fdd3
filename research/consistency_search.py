r"""Does a base more consistent with the releases get more weights right?

At low ranks ``auto``'s bf16 output is not explained by the releases as a
whole (:func:`detune_jax.explain_releases` finds no rank-``r`` updates with
which it reproduces every released value), and a few of its wrong entries
are closed to first order (docs/results.md, "What the releases determine"):
the releases may determine them. Any base that *is* explained as a whole
equals the true one at every determined entry. This experiment asks whether
searching toward such a base, from ``auto``'s output and reading only the
releases, gets those entries (and others) right.

The search (:func:`research.identifiability.consistency_search`) is greedy
over single grid steps. The score of a base is the
share of released values that ``explain_releases`` reproduces after
``--score_steps`` projections started from the current updates ``M_i``.
Each round scores every entry with a value not reproduced, one grid step
up and one down, and keeps the ``--accept`` best moves that score above
the current base (at distinct entries). With ``--candidates=K`` it scores
only K moves: the entries that the rounding intervals pull hardest given
the ``M_i`` (``sum_i clip(W + M_i, lo_i, hi_i) - (W + M_i)``, largest in
size), each one grid step the way it is pulled; cheaper per round, but it
stalls sooner. When no move scores higher, the moves of every entry with
a value not reproduced are scored again with four times the projections.
Each round ends with a search on the new base (four times the
projections) for the next round's ``M_i``. The search stops when the base
is explained (a witness found: the releases are exactly consistent with
it), when no move scores higher, or after ``--rounds`` rounds.

It prints per layer ``auto``'s and the searched base's bit-exact shares,
the share of values each reproduces, and how many of ``auto``'s wrong
entries the search put right and how many right ones it put wrong. With
``--first_order`` it also runs
:func:`detune_jax.first_order_margin` for each of ``auto``'s
wrong entries (the true base with ``auto``'s value there, at the true
base's witness) and says how many of those closed to first order (margin
< 0 on some release) the search put right. An evaluation tool: it needs
the true base. It is slow (each score is a search over the whole layer),
so it is a measurement, not a method.
Results: docs/results.md, "Why low ranks are harder".

  python -m research.consistency_search --dim=64 --rank=2 --layers=2 \
      --first_order
"""

from __future__ import annotations

import json
import time
from typing import Sequence

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

from detune_jax.solvers import grid
from detune_jax.solvers import grid_diagnostics
from detune_jax.solvers import registry
from detune_jax.synthetic import lora_stack
from research import identifiability

FLAGS = flags.FLAGS


def define_flags():
  """Flags of the binary (defined on run, so that imports never clash)."""
  flags.DEFINE_integer("n", 3, "Number of fine-tunes.")
  flags.DEFINE_integer("dim", 64, "Synthetic layer size.")
  flags.DEFINE_integer("rank", 2, "LoRA rank.")
  flags.DEFINE_integer("layers", 2, "Synthetic layers.")
  flags.DEFINE_integer("rounds", 30, "Rounds of the search at most.")
  flags.DEFINE_integer("accept", 10, "Moves kept per round at most.")
  flags.DEFINE_integer("score_steps", 1000, "Projections per score.")
  flags.DEFINE_integer("candidates", 0, "Moves scored per round: 0, every "
                       "entry with a value not reproduced, one grid step up "
                       "and one down; else that many entries, those the "
                       "rounding intervals pull hardest, one step their way "
                       "(cheaper; it stalls sooner).")
  flags.DEFINE_integer("explain_steps", 32000, "Projections of the first "
                       "search on auto's output.")
  flags.DEFINE_bool("first_order", False, "Also the first-order test of "
                    "each of auto's wrong entries (an LP per release and "
                    "entry).")
  flags.DEFINE_integer("grid_redecode_steps", grid.GridSettings().redecode_steps,
                       "auto's grid_redecode_steps (0: the grid step without "
                       "re-reading the entries in doubt).")
  flags.DEFINE_float("grid_momentum", grid.MOMENTUM, "auto's grid_momentum "
                     "(0: plain projections).")
  flags.DEFINE_float("explain_relax", grid_diagnostics.EXPLAIN_RELAX,
                     "explain_releases's relax in every search (1.9 with "
                     "--explain_momentum=0: the over-relaxed search without "
                     "momentum).")
  flags.DEFINE_float("explain_momentum", grid_diagnostics.EXPLAIN_MOMENTUM,
                     "explain_releases's momentum in every search.")
  flags.DEFINE_string("json_out", None, "Write the rows to this JSON file.")


def main(argv: Sequence[str]) -> None:
  del argv
  search = dict(relax=FLAGS.explain_relax, momentum=FLAGS.explain_momentum)
  truths, releases = lora_stack(0, FLAGS.dim, FLAGS.dim, FLAGS.n, FLAGS.rank,
                                layers=FLAGS.layers, dtype="bfloat16")
  rows = []
  for layer in range(FLAGS.layers):
    Wp = jnp.asarray(releases[layer])
    truth = np.asarray(jnp.asarray(truths[layer], jnp.float32))
    W_a, _ = registry.solve(Wp, FLAGS.rank, solver="auto",
                            grid=grid.GridSettings(
                                redecode_steps=FLAGS.grid_redecode_steps,
                                momentum=FLAGS.grid_momentum))
    W_a = np.asarray(W_a, np.float32)
    start = time.perf_counter()
    W_s, info = identifiability.consistency_search(
        Wp, W_a, FLAGS.rank, rounds=FLAGS.rounds, accept=FLAGS.accept,
        score_steps=FLAGS.score_steps, explain_steps=FLAGS.explain_steps,
        candidates=FLAGS.candidates, log=lambda s: print(s, flush=True),
        search=search)
    wrong_a, wrong_s = W_a != truth, W_s != truth
    row = dict(layer=layer, auto=float(np.mean(~wrong_a)),
               searched=float(np.mean(~wrong_s)),
               auto_wrong=int(wrong_a.sum()),
               put_right=int(np.sum(wrong_a & ~wrong_s)),
               put_wrong=int(np.sum(~wrong_a & wrong_s)),
               seconds=time.perf_counter() - start, **info)
    if row["explained"]:
      # An explained base: the releases determine no weight where it differs
      # from the true one.
      row["identifiable_bound"] = row["searched"]
    print(f"layer {layer}: auto {100 * row['auto']:.2f}% bit-exact "
          f"({100 * row['reproduced_start']:.2f}% of the values "
          f"reproduced), searched {100 * row['searched']:.2f}% "
          f"({100 * row['reproduced']:.2f}%, explained: {row['explained']}; "
          f"{row['rounds']} rounds, {row['seconds']:.0f} s); of auto's "
          f"{row['auto_wrong']} wrong entries {row['put_right']} put right, "
          f"{row['put_wrong']} right ones put wrong", flush=True)
    if FLAGS.first_order:
      witness = grid_diagnostics.explain_releases(
          Wp, truth, FLAGS.rank, max_steps=FLAGS.explain_steps, **search)
      if not bool(witness.explained):
        print(f"layer {layer}: the true base not explained; no first-order "
              "test", flush=True)
      else:
        entries = np.flatnonzero(wrong_a)
        margins = identifiability.first_order_margins(
            Wp, truth, W_a, FLAGS.rank, witness.updates, entries)
        closed = margins < 0
        right = ~wrong_s.ravel()[entries]
        row.update(closed=int(closed.sum()),
                   closed_put_right=int(np.sum(closed & right)),
                   closed_margins=np.sort(margins[closed]).tolist())
        print(f"layer {layer}: {row['closed']} of auto's wrong entries are "
              f"closed to first order; the search put "
              f"{row['closed_put_right']} of them right", flush=True)
    rows.append(row)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
