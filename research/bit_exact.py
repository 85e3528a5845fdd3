r"""How many weights of a bf16 release come back bit-exactly, and the ceiling.

For fine-tunes released in bfloat16 (the base on the bf16 grid, the merges
rounded to it), prints per n the fraction of base weights recovered
bit-exactly and the W-Error by:

* ``closed_form`` rounded to the grid (no dtype-aware step);
* ``auto``, the default (closed form, then :func:`detune_jax.grid_refine`
  with ``GridSettings().restarts`` restarts); ``--grid_restarts=0,1`` adds a
  row per other number of restarts (``auto+r0``), ``--grid_snap_from``,
  ``--grid_shrink``, ``--grid_redecode_steps`` and ``--grid_momentum`` rows
  for other settings of the grid step's annealing, narrowed box, re-reading
  of the entries in doubt and extrapolated projections
  (``auto+snap0.5+shrink0+redecode0+mom0`` turns off the grid step's
  snapping schedule, shrinking box, re-reading and momentum,
  ``auto+redecode0+mom0`` only the last two, ``auto+mom0`` the last);
* ``oracle``: ``grid_refine`` started from the true base (one round, no
  restart). It measures how
  much this estimator keeps when its start is right: what is lost from
  there is lost to the M-step's noise, not to a wrong starting point;
* ``data_limit``: the share of weights the data determine given the true
  updates ``M_i`` (the float32 ``W'_i - W`` before the release's rounding):
  those whose rounding intervals ``[lo_i - M_i, hi_i - M_i]`` intersect in
  a span holding no other grid point than the base's. No estimator that
  reads only the releases can pin more (in the row: that share, and as
  ``bit_exact`` the midrange estimate from the true ``M_i``; see
  :func:`detune_jax.solvers.grid_diagnostics.determined_fraction`).

With ``--explain``, also whether each base is *explained* by the releases
(:func:`detune_jax.explain_releases`: rank-r updates found with which it
reproduces every released value bit for bit), for ``auto``, ``oracle`` and
the true base (rows ``explain_<name>``: layers explained, share of the
values reproduced), and ``identifiable_bound``: the share of weights where
every explained base equals the true one. The releases are exactly
consistent with each explained base, so they determine no weight outside
that share; where ``auto`` is explained, every weight it gets wrong is one
the releases leave open (``data_limit`` assumes the true updates known).

With ``--explain_swaps``, also explained bases next to the true one, which
make the bound tighter where ``auto`` is not explained (at low ranks):
``explain_moved``, the true base with every entry that the true updates
leave open moved to another grid point; and ``swaps_<name>``, per entry
where a candidate differs from the true base on a layer it does not
explain, whether the true base with the candidate's value there (alone)
is explained (searches started from the true base's witness; singly, or
in groups of ``--swap_group`` that are split in halves when not
explained).
An entry found so is open: the releases do not determine it.

  python -m research.bit_exact --ns=3,5 --dim=256 --layers=2
  python -m research.bit_exact --scenario=minilm --ns=3,5
  python -m research.bit_exact --ns=3 --dim=256 --layers=2 --explain
  python -m research.bit_exact --ns=3 --dim=96 --rank=4 --layers=2 \
      --explain --explain_swaps
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Sequence

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

import detune_jax as dj
from detune_jax import model_stacks
from detune_jax.solvers import grid
from detune_jax.solvers import grid_diagnostics
from detune_jax.solvers import registry
from detune_jax.synthetic import lora_stack
from research import identifiability

FLAGS = flags.FLAGS


def define_flags():
  """Flags of the binary (defined on run, so that imports never clash)."""
  flags.DEFINE_enum("scenario", "gaussian", ["gaussian", "minilm"],
                    "gaussian (synthetic) or minilm (the cached real "
                    "rank-16 fine-tunes of the shipped MiniLM bench).")
  flags.DEFINE_list("ns", ["3", "5"], "Numbers of fine-tunes.")
  flags.DEFINE_integer("dim", 256, "Synthetic layer size.")
  flags.DEFINE_integer("rank", 16, "LoRA rank.")
  flags.DEFINE_integer("layers", 2, "Synthetic layers.")
  flags.DEFINE_integer("grid_steps", grid.GridSettings().steps, "Alternations of "
                       "grid_refine per round.")
  flags.DEFINE_list("grid_restarts", [str(grid.GridSettings().restarts)],
                    "Restarts of grid_refine for the auto rows: one row per "
                    "value; the default's row is 'auto', others 'auto+rN'.")
  flags.DEFINE_list("grid_snap_from", [str(grid.SNAP_FROM)],
                    "grid_refine's snap_from for the auto rows (0.5: every "
                    "entry snapped from the first alternation): one row per "
                    "value and per value of the other grid flags; rows off "
                    "the default are named e.g. 'auto+snap0.5'.")
  flags.DEFINE_list("grid_shrink", [str(grid.SHRINK)],
                    "grid_refine's shrink for the auto rows (0: the full box), "
                    "as --grid_snap_from; rows e.g. 'auto+shrink0'.")
  flags.DEFINE_list("grid_redecode_steps", [str(grid.GridSettings().redecode_steps)],
                    "grid_refine's redecode_steps for the auto rows (0: no "
                    "re-reading of the entries in doubt), as --grid_snap_from; "
                    "rows e.g. "
                    "'auto+redecode0'.")
  flags.DEFINE_list("grid_momentum", [str(grid.MOMENTUM)],
                    "grid_refine's momentum for the auto rows (0: plain "
                    "projections), as --grid_snap_from; rows e.g. 'auto+mom0'.")
  flags.DEFINE_list("grid_free_steps", [str(grid.FREE_STEPS)],
                    "grid_refine's free_steps for the auto rows (0: no free "
                    "projections before the alternation), as "
                    "--grid_snap_from; rows e.g. 'auto+free0'.")
  flags.DEFINE_string("minilm_dir", model_stacks.MINILM_DIR,
                    "A folder of base/ and fine-tunes ft*/ (default: the shipped MiniLM bench's rank-16 adapters, merged there on first use).")
  flags.DEFINE_string("json_out", None, "Write the rows to this JSON file.")
  flags.DEFINE_bool("explain", False, "Also look for rank-r updates with which "
                    "the default auto row's base and the true base reproduce "
                    "every released value (explain_releases; float64, "
                    "up to a minute per MiniLM layer).")
  flags.DEFINE_integer("explain_steps", 32000, "explain_releases's max_steps.")
  flags.DEFINE_float("explain_relax", grid_diagnostics.EXPLAIN_RELAX,
                     "explain_releases's relax (1.9 with --explain_momentum=0: "
                     "the over-relaxed search without momentum).")
  flags.DEFINE_float("explain_momentum", grid_diagnostics.EXPLAIN_MOMENTUM,
                     "explain_releases's momentum.")
  flags.DEFINE_bool("explain_swaps", False, "With --explain, also look for "
                    "explained bases next to the true one: (a) the true base "
                    "with every entry that the true updates leave open moved "
                    "to another grid point of its intersection (row "
                    "explain_moved); (b) for each layer where a candidate of "
                    "--swaps_of is not explained, the true base with the "
                    "candidate's value at one of the entries where they "
                    "differ (rows swaps_<name>). Each one explained is an "
                    "entry the releases leave open; the bound counts them.")
  flags.DEFINE_list("swaps_of", ["auto", "oracle"], "Candidates whose "
                    "differences from the true base --explain_swaps tests.")
  flags.DEFINE_integer("swap_group", 1, "Entries swapped together in a first "
                       "test; a group not explained is split in halves down to "
                       "single entries (groups pay where most entries are "
                       "open and few interact: at 96x96 r=4, not at 256x256).")
  flags.DEFINE_integer("swap_sample", 0, "Test at most this many of a layer's "
                       "entries (a seeded random sample; 0: all). The bound "
                       "counts only the entries tested; the rows give the "
                       "share open among them.")
  flags.DEFINE_integer("swap_steps", 8000, "explain_releases's max_steps per "
                       "swap test (started from the true base's witness).")
  flags.DEFINE_enum("swap_first_order", "none", ["none", "unopened", "all"],
                    "Also the first-order test (first_order_margin, an LP "
                    "per release) of each swap: the true base with the "
                    "candidate's value at one entry, at the true base's "
                    "witness; for the tested entries the search did not open "
                    "(unopened) or for every tested entry (all, to compare the "
                    "two). An entry whose margin is < 0 on some release is "
                    "closed to first order: no update next to the witness "
                    "explains that base.")


def scenario_stack(n: int, dtype: str):
  """``(W_true [L, d, k], W_primes [L, n, d, k])`` of ``--scenario`` in
  ``dtype``: synthetic (:func:`detune_jax.synthetic.lora_stack`, seed 0) or
  the real fine-tunes."""
  if FLAGS.scenario == "minilm":
    return model_stacks.folder_stack(FLAGS.minilm_dir, n, dtype=dtype)
  W, Wp = lora_stack(0, FLAGS.dim, FLAGS.dim, n, FLAGS.rank,
                     layers=FLAGS.layers, dtype=dtype)
  return np.asarray(W), np.asarray(Wp)


# The grid step's settings with a row of ``auto`` per value: (the name of
# the flag and ``GridSettings`` field (flag ``grid_<name>``), its type, its default, the
# row-name suffix off the default).
_GRID_ROWS = (("restarts", int, grid.GridSettings().restarts, "r"),
              ("snap_from", float, grid.SNAP_FROM, "snap"),
              ("shrink", float, grid.SHRINK, "shrink"),
              ("redecode_steps", int, grid.GridSettings().redecode_steps,
               "redecode"),
              ("momentum", float, grid.MOMENTUM, "mom"),
              ("free_steps", int, grid.FREE_STEPS, "free"))


def _auto_name(settings) -> str:
  """'auto', with a suffix for each grid setting (``{name: value}``) off
  the default, e.g. 'auto+r0+mom0'."""
  return "auto" + "".join(
      f"+{tag}{settings[name]:g}" if kind is float else
      f"+{tag}{settings[name]}"
      for name, kind, default, tag in _GRID_ROWS if settings[name] != default)


def _row(name, n, W, W_true):
  return dict(method=name, n=n,
              bit_exact=float(dj.bit_exact_fraction(jnp.asarray(W),
                                                    jnp.asarray(W_true))),
              w_error=float(dj.w_error(jnp.asarray(W, jnp.float32),
                                       jnp.asarray(W_true, jnp.float32))))


def _search():
  """explain_releases' search options from the flags."""
  return dict(relax=FLAGS.explain_relax, momentum=FLAGS.explain_momentum)


def _explain_row(name, n, Wp, W, truth, start):
  """``(row, explanation)``: whether ``explain_releases`` (from the updates
  ``start``, or from scratch) explains the base ``W`` on each layer."""
  t0 = time.perf_counter()
  ex = grid_diagnostics.explain_releases(
      Wp, np.asarray(W, np.float32), FLAGS.rank,
      max_steps=FLAGS.explain_steps, start=start, **_search())
  explained = np.asarray(ex.explained).reshape(truth.shape[:-2])
  same = np.asarray(grid.bit_exact_mask(np.asarray(W, np.float32), truth))
  row = dict(method=f"explain_{name}", n=n,
             explained_layers=int(np.sum(explained)),
             layers=int(explained.size),
             reproduced=float(np.mean(ex.reproduced)),
             max_steps_taken=int(np.max(ex.steps)),
             differ=float(np.mean(~same)),
             seconds=time.perf_counter() - t0)
  if not explained.all():
    row["not_explained"] = {int(i): float(np.ravel(ex.reproduced)[i])
                            for i in np.flatnonzero(~explained.ravel())}
  print(f"{FLAGS.scenario} n={n} explain_{name:7s} every release "
        f"reproduced on {row['explained_layers']}/{row['layers']} "
        f"layers ({100 * row['reproduced']:.4f}% of the values; "
        f"<= {row['max_steps_taken']} projections, "
        f"{row['seconds']:.0f} s)", flush=True)
  for i, frac in row.get("not_explained", {}).items():
    print(f"  layer {i}: {100 * frac:.4f}% of its values reproduced after "
          f"{FLAGS.explain_steps} projections", flush=True)
  return row, ex


def _first_order_summary(margins, opened, seconds) -> dict:
  """What the first-order test found, by whether the search opened the
  entry (``margins``: NaN where the test did not run)."""
  ran = ~np.isnan(margins)
  closed = margins < 0
  return dict(tested=int(ran.sum()),
              open_closed=int(np.sum(ran & opened & closed)),
              open_reachable=int(np.sum(ran & opened & ~closed)),
              unopened_closed=int(np.sum(ran & ~opened & closed)),
              unopened_reachable=int(np.sum(ran & ~opened & ~closed)),
              unopened_margins=np.sort(margins[ran & ~opened]).tolist(),
              seconds=seconds)


def _swap_row(name, n, Wp, W, truth, found):
  """``(row, opened)``: the swap tests of one candidate base ``W`` on each
  layer it does not explain (and the true base does), and the entries
  found open (the true base with ``W``'s value there is explained)."""
  t0 = time.perf_counter()
  W = np.asarray(W, np.float32).reshape((-1,) + truth.shape[-2:])
  explained = np.asarray(found[name].explained).ravel()
  witness = found["truth"].updates.reshape((-1,) + Wp.shape[-3:])
  layers = np.asarray(truth, np.float32).reshape(W.shape)
  releases = jnp.reshape(Wp, (-1,) + Wp.shape[-3:])
  opened = np.zeros(W.shape, bool)
  tested = np.zeros(W.shape, bool)
  tests = 0
  lp_seconds = 0.0
  # Smallest first-order margin of each entry's swap (NaN: not run).
  margins = np.full(W.shape, np.nan)
  # Where the search did not explain the true base either, swaps started
  # from its incomplete witness would only fail: skipped.
  truth_explained = np.asarray(found["truth"].explained).ravel()
  skipped = int(np.sum(~explained & ~truth_explained))
  for i in np.flatnonzero(~explained & truth_explained):
    opened[i], tested[i], t = identifiability.swap_tests(
        releases[i], layers[i], W[i], FLAGS.rank, witness[i],
        group=FLAGS.swap_group, steps=FLAGS.swap_steps, seed=i,
        sample=FLAGS.swap_sample, search=_search())
    tests += t
    if FLAGS.swap_first_order != "none":
      todo = tested[i] if FLAGS.swap_first_order == "all" else (
          tested[i] & ~opened[i])
      entries = np.flatnonzero(todo)
      lp_start = time.perf_counter()
      margins[i].flat[entries] = identifiability.first_order_margins(
          releases[i], layers[i], W[i], FLAGS.rank, witness[i], entries)
      lp_seconds += time.perf_counter() - lp_start
  differ = ~np.asarray(grid.bit_exact_mask(W, layers))
  differ &= (~explained & truth_explained)[:, None, None]
  row = dict(method=f"swaps_{name}", n=n, differ=float(np.mean(differ)),
             tested=int(tested.sum()), open=float(np.mean(opened)),
             open_of_tested=float(opened.sum() / max(tested.sum(), 1)),
             tests=tests, skipped_layers=skipped,
             seconds=time.perf_counter() - t0)
  if FLAGS.swap_first_order != "none":
    row["first_order"] = _first_order_summary(margins, opened, lp_seconds)
  _print_swap_row(row, name, n, int(differ.sum()), int(opened.sum()))
  return row, opened


def _print_swap_row(r, name, n, differ, opened) -> None:
  if not differ and not r["skipped_layers"]:
    print(f"{FLAGS.scenario} n={n} swaps_{name:8s} nothing to test (it is "
          f"explained wherever the true base is)", flush=True)
    return
  skipped = r["skipped_layers"]
  print(f"{FLAGS.scenario} n={n} swaps_{name:8s} it differs from the "
        f"true base at {differ} entries (on layers it does not "
        f"explain); of the {r['tested']} tested, {opened} "
        f"({100 * r['open_of_tested']:.1f}%) are open: the true base with "
        f"that value is explained "
        f"({r['tests']} tests, {r['seconds']:.0f} s)"
        + (f"; {skipped} layers skipped (the true base not explained "
           "there either)" if skipped else ""), flush=True)
  if "first_order" in r:
    f = r["first_order"]
    unopened = f["unopened_closed"] + f["unopened_reachable"]
    shown = f["open_closed"] + f["open_reachable"]
    print(f"{FLAGS.scenario} n={n} swaps_{name:8s} first order: of the "
          f"{unopened} tested entries not shown open, "
          f"{f['unopened_closed']} are closed (LP margin < 0 on some "
          f"release, the true base elsewhere) and "
          f"{f['unopened_reachable']} reachable"
          + (f"; of the {shown} shown open, {f['open_closed']} closed"
             if shown else ""), flush=True)


def _explain_rows(rows, n, Wp, W_true, candidates, M_true=None) -> None:
  """Rows ``explain_<name>`` for the true base and each candidate base, and
  ``identifiable_bound``: the share of weights where every explained base
  equals the true one. The releases are exactly consistent with each
  explained base, so no weight outside that share is determined by them.
  With ``M_true`` (``--explain_swaps``), also the explained bases next to
  the true one (``explain_moved``, ``swaps_<name>``)."""
  truth = np.asarray(W_true)
  agree = np.ones(truth.shape, bool)
  candidates = [("truth", W_true)] + candidates
  if M_true is not None:
    candidates.append(("moved",
                       identifiability.moved_base(Wp, M_true, W_true)))
  found = {}
  for name, W in candidates:
    if W is None:
      continue
    row, found[name] = _explain_row(
        name, n, Wp, W, truth,
        start=found["truth"].updates if name == "moved" else None)
    explained = np.asarray(found[name].explained).reshape(truth.shape[:-2])
    same = np.asarray(grid.bit_exact_mask(np.asarray(W, np.float32), truth))
    agree &= same | ~explained[..., None, None]
    rows.append(row)
  for name, W in candidates:
    if M_true is None or name not in FLAGS.swaps_of or W is None:
      continue
    row, opened = _swap_row(name, n, Wp, W, truth, found)
    agree &= ~opened.reshape(truth.shape)
    rows.append(row)
  rows.append(dict(method="identifiable_bound", n=n,
                   bit_exact=float(np.mean(agree))))
  print(f"{FLAGS.scenario} n={n} identifiable_bound  at most "
        f"{100 * rows[-1]['bit_exact']:5.1f}% of the weights are determined "
        f"by the releases (the share where every explained base is the true "
        f"one)", flush=True)


def main(argv: Sequence[str]) -> None:
  del argv
  rows = []
  for n in (int(x) for x in FLAGS.ns):
    W_true, Wp = scenario_stack(n, "bfloat16")
    Wp = jnp.asarray(Wp)
    raw, _ = registry.solve(Wp, FLAGS.rank, solver="closed_form",
                            dtype_aware=False)
    autos = []
    for values in itertools.product(*(
        [kind(x) for x in getattr(FLAGS, "grid_" + name)]
        for name, kind, _, _ in _GRID_ROWS)):
      settings = dict(zip((row[0] for row in _GRID_ROWS), values))
      start = time.perf_counter()
      W_a, _ = registry.solve(Wp, FLAGS.rank, solver="auto",
                              grid=grid.GridSettings(steps=FLAGS.grid_steps,
                                                     **settings))
      W_a = np.asarray(W_a)
      autos.append((_auto_name(settings), W_a, time.perf_counter() - start))
    oracle, _ = dj.grid_refine(Wp, jnp.asarray(W_true, jnp.float32),
                               FLAGS.rank, steps=FLAGS.grid_steps)
    # The true updates: the float32 merges of the same stack, less the base.
    Wf, Wpf = scenario_stack(n, "float32")
    determined, mid = grid_diagnostics.determined_fraction(
        Wp, np.asarray(Wpf) - np.asarray(Wf)[..., None, :, :], W_true)
    for name, W, sec in ([("closed_form", raw, None)] + autos
                         + [("oracle", oracle, None)]):
      rows.append(_row(name, n, W, W_true))
      r = rows[-1]
      took = "" if sec is None else f"  ({sec:.1f} s)"
      if sec is not None:
        r["seconds"] = sec
      print(f"{FLAGS.scenario} n={n} {name:20s} bit-exact "
            f"{100 * r['bit_exact']:5.1f}%  W-Error {r['w_error']:7.2f}{took}",
            flush=True)
    rows.append(dict(method="data_limit", n=n, determined=determined,
                     bit_exact=mid))
    print(f"{FLAGS.scenario} n={n} data_limit   determined "
          f"{100 * determined:5.1f}% given the true M_i (midrange from them: "
          f"{100 * mid:5.1f}% bit-exact)", flush=True)
    if FLAGS.explain:
      _explain_rows(rows, n, Wp, W_true,
                    [("auto", dict((a[0], a[1]) for a in autos).get("auto")),
                     ("oracle", oracle)],
                    M_true=(np.asarray(Wpf) - np.asarray(Wf)[..., None, :, :]
                            if FLAGS.explain_swaps else None))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
