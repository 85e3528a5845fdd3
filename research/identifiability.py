"""Which weights of a low-precision release the releases determine.

A base is *explained* by the releases when rank-``r`` updates exist with
which it reproduces every released value bit for bit
(:func:`detune_jax.explain_releases`). Each explained base is as consistent
with the releases as the true one, so the releases determine no weight
where an explained base differs from the truth. These are the measurements
that the studies ``python -m research.bit_exact`` and ``python -m
research.consistency_search`` share: tests of bases next to the true one
(one entry or a group of entries changed), a first-order test of such a
change, and a greedy search toward an explained base. Evaluation tools: they
need the true base.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from detune_jax.solvers import grid
from detune_jax.solvers import grid_diagnostics

__all__ = ["explain_changed", "swap_tests", "first_order_margins",
           "moved_base", "all_moves", "pulled_moves", "consistency_search"]


def explain_changed(Wp, W, changes, rank, *, steps, start=None, chunk=32,
                    search=None):
  """``(explained, reproduced)`` arrays, one per change: whether
  :func:`~detune_jax.explain_releases` (``steps`` projections, from the
  updates ``start`` if given; its other options ``search``) explains ``W``
  with one change ``(flat entries, values)`` made, and the share of
  released values reproduced; ``chunk`` bases a call."""
  explained, reproduced = [], []
  for c in range(0, len(changes), chunk):
    batch = changes[c:c + chunk]
    bases = np.repeat(np.ravel(W)[None], len(batch), 0)
    for base, (idx, v) in zip(bases, batch):
      base[idx] = v
    g = len(batch)
    ex = grid_diagnostics.explain_releases(
        jnp.broadcast_to(Wp, (g,) + Wp.shape),
        bases.reshape((g,) + np.shape(W)), rank, max_steps=steps,
        start=None if start is None else np.broadcast_to(
            start, (g,) + np.shape(start)), **(search or {}))
    explained += np.ravel(ex.explained).tolist()
    reproduced += np.ravel(ex.reproduced).tolist()
  return np.asarray(explained, bool), np.asarray(reproduced)


def swap_tests(Wp, truth, W, rank, start, *, group, steps, seed,
               sample=0, chunk=32, search=None):
  """``(open mask, tested mask, tests run)``: the entries of one layer
  where ``W`` differs from ``truth`` and the true base with ``W``'s value
  there is explained (with ``group - 1`` other such entries at first: a
  group that is explained clears all of its entries, one that is not is
  split in halves down to single entries); ``sample``: test at most that
  many (0: all). ``start``: the true base's witness, or None."""
  flat, values = truth.ravel(), W.ravel()
  differ = np.flatnonzero(~np.asarray(grid.bit_exact_mask(W, truth)).ravel())
  differ = np.random.default_rng(seed).permutation(differ)
  if sample:
    differ = differ[:sample]
  pending = [differ[i:i + group] for i in range(0, differ.size, group)]
  open_ = np.zeros(flat.size, bool)
  tests = 0
  while pending:
    explained, _ = explain_changed(
        Wp, truth, [(idx, values[idx]) for idx in pending], rank,
        steps=steps, start=start, chunk=chunk, search=search)
    tests += len(pending)
    split = []
    for idx, ok in zip(pending, explained):
      if ok:
        open_[idx] = True
      elif idx.size > 1:
        split += [idx[:idx.size // 2], idx[idx.size // 2:]]
    pending = split
  tested = np.zeros(flat.size, bool)
  tested[differ] = True
  return open_.reshape(truth.shape), tested.reshape(truth.shape), tests


def first_order_margins(Wp, truth, W, rank, witness, entries):
  """The smallest :func:`~detune_jax.first_order_margin` over the
  releases of the true base with ``W``'s value at each of ``entries`` (flat
  indices), at the true base's witness."""
  out = np.zeros(len(entries))
  for j, e in enumerate(entries):
    base = truth.ravel().copy()
    base[e] = W.ravel()[e]
    out[j] = grid_diagnostics.first_order_margin(
        Wp, base.reshape(truth.shape), witness, rank).min()
  return out


def moved_base(Wp, M, truth):
  """The true base with each entry that the true updates ``M`` leave open
  (another grid point in its intersection) moved to that grid point."""
  lo, hi = grid.rounding_interval(jnp.asarray(Wp))
  moved, _ = grid_diagnostics.open_neighbours(
      lo, hi, jnp.asarray(M, jnp.float32), jnp.asarray(truth))
  return np.asarray(moved)


def all_moves(Wp, W, M):
  """Every entry with a value not reproduced by ``W + M_i``, one grid step
  up and one down: ``[(flat entry, value)]``. Released zeros are left out
  (``explain_releases`` counts them within a tolerance; no grid step of
  ``W`` mends them)."""
  out = (np.asarray(W, np.float64)[None] + M).astype(np.float32)
  out = np.asarray(jnp.asarray(out).astype(Wp.dtype))
  released = np.asarray(Wp)
  entries = np.flatnonzero(((out != released) & (released != 0)).any(0))
  Wb = jnp.asarray(W.ravel()[entries], Wp.dtype)
  return [(e, float(v)) for up in (True, False) for e, v in
          zip(entries, np.asarray(grid._next_toward(Wb, up), np.float32))]


def pulled_moves(Wp, W, M, count):
  """The ``count`` entries that the rounding intervals pull hardest, one
  grid step the way they pull: ``sum_i clip(W + M_i, lo_i, hi_i) - (W +
  M_i)``, the step ``W`` would take toward the boxes given the ``M_i``."""
  lo, hi = (np.asarray(x, np.float64) for x in grid.rounding_interval(Wp))
  S = np.asarray(W, np.float64)[None] + M
  # Released zeros left out, as in all_moves.
  pull = np.where(np.asarray(Wp) != 0, np.clip(S, lo, hi) - S, 0.0)
  pull = pull.sum(0).ravel()
  entries = np.argsort(-np.abs(pull), kind="stable")[:count]
  entries = entries[pull[entries] != 0]
  Wb = jnp.asarray(W.ravel()[entries], Wp.dtype)
  up = np.asarray(grid._next_toward(Wb, True), np.float32)
  down = np.asarray(grid._next_toward(Wb, False), np.float32)
  return list(zip(entries, np.where(pull[entries] > 0, up, down).tolist()))


def _scores(Wp, W, M, rank, moves, steps, search):
  """Reproduced share of each base ``W`` with one move ``(entry, value)``,
  after ``steps`` projections from ``M``."""
  return explain_changed(Wp, W, moves, rank, steps=steps, start=M, chunk=64,
                         search=search)[1]


def consistency_search(Wp, W, rank, *, rounds, accept, score_steps,
                       explain_steps, candidates=0, start=None, log=None,
                       search=None):
  """A greedy search over single grid steps toward an explained base, on
  one layer, from ``W`` (and the first search from the updates ``start``,
  if given); ``search``: explain_releases' other options in every search
  (e.g. ``relax``).

  The score of a base is the share of released values that
  ``explain_releases`` reproduces after ``score_steps`` projections from
  the current updates ``M_i``. Each round scores the moves of
  :func:`all_moves` (or, with ``candidates`` > 0, that many of
  :func:`pulled_moves`) and keeps the ``accept`` best that score above the
  current base, at distinct entries; when none does, every entry's moves
  are scored again with four times the projections. Each round ends with a
  search on the new base (four times the projections) for the next round's
  ``M_i``. It stops when the base is explained, when no move scores
  higher, or after ``rounds`` rounds (``python -m
  research.consistency_search`` describes the study).

  Returns ``(W, info)``: the searched float32 base and a dict with the
  reproduced share before and after, whether the result is explained, and
  the rounds run.
  """
  W = np.array(W, np.float32)
  search = search or {}
  ex = grid_diagnostics.explain_releases(Wp, W, rank,
                                         max_steps=explain_steps,
                                         start=start, **search)
  M, cur = ex.updates, float(ex.reproduced)
  info = dict(reproduced_start=cur, explained_start=bool(ex.explained))
  rounds_run = 0
  while not bool(ex.explained) and rounds_run < rounds:
    rounds_run += 1
    moves = (pulled_moves(Wp, W, M, candidates) if candidates
             else all_moves(Wp, W, M))
    scores = _scores(Wp, W, M, rank, moves, score_steps, search)
    if not np.any(scores > cur):
      # A stall: the scores are searches cut short, so the moves of every
      # entry with a value not reproduced are scored with longer ones
      # before giving up.
      moves = all_moves(Wp, W, M)
      scores = _scores(Wp, W, M, rank, moves, 4 * score_steps, search)
    taken = set()
    for i in np.argsort(-scores, kind="stable"):
      if scores[i] <= cur or len(taken) >= accept:
        break
      e, v = moves[i]
      if e not in taken:
        taken.add(e)
        W.flat[e] = v
    # A longer search on the new base (on the same one when no move scored
    # higher: it may still be explained).
    ex = grid_diagnostics.explain_releases(Wp, W, rank,
                                           max_steps=4 * score_steps,
                                           start=M, **search)
    M, cur = ex.updates, float(ex.reproduced)
    if log:
      log(f"  round {rounds_run}: {len(moves)} moves scored, {len(taken)} "
          f"kept; {100 * cur:.3f}% reproduced")
    if not taken:
      break
  info.update(reproduced=cur, explained=bool(ex.explained),
              rounds=rounds_run)
  return W, info
