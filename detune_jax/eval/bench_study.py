"""The paper's tables and figures on a bench of real LoRA fine-tunes.

Spectral DeTuning (Horwitz et al. 2024) reports, on LoWRA Bench, W-Error and
a semantic distance of the recovered model against two baselines: LoRA-FT
(the fine-tuned models themselves) and Mean-LoRA (their average); Table 2 is
the mean over random subsets of n = 5 fine-tunes, Fig. 5 and 6 the ablation
of the rank scheduler, Fig. 7 and 10 the scores against n. This module runs
those on the MiniLM bench (:mod:`detune_jax.lora.bench`) with the semantic
metric of the paper's text models, the SBERT distance of the recovered
encoder's sentence embeddings to the base's.

Everything is in memory: :func:`load_bench` merges every adapter of a subset
into the base once (``[L, N, d, k]`` float32 stacks, one per layer shape),
:func:`recover_layers` solves a subset of the fine-tunes' columns with a
solver of :mod:`detune_jax.solvers.registry`, and a :class:`Scorer` scores
any set of replaced layers (W-Error, per-layer W-Error, bit-exact share and
SBERT distance, the base's encoder compiled once and reused for every model).
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import ml_dtypes
import numpy as np

from detune_jax import metrics
from detune_jax.eval import sbert
from detune_jax.io import peft
from detune_jax.io.models import ModelFiles
from detune_jax.models import bert
from detune_jax.solvers import registry
from detune_jax.solvers.schedule import RankSchedule

Layers = Dict[str, np.ndarray]

# Row names of the tables, in the paper's order; AUTO is this project's
# default solver.
LORA_FT, MEAN_LORA, SPECTRAL_DETUNING, AUTO = (
    "LoRA-FT", "Mean-LoRA", "Spectral DeTuning", "auto")
METHODS = (LORA_FT, MEAN_LORA, SPECTRAL_DETUNING, AUTO)
_SOLVER_OF = {MEAN_LORA: "mean_lora", SPECTRAL_DETUNING: "spectral_detuning",
              AUTO: "auto"}


class Bench(NamedTuple):
  """A subset of the bench merged into its base, in memory.

  Attributes:
    model_dir: the base's HF directory (config and tokenizer).
    adapters: the adapters' directory names, in column order.
    ranks: ``[N]`` each adapter's LoRA rank.
    names: the fine-tuned matrices' HF names, sorted.
    groups: ``{(d, k): [name, ...]}`` the names by shape, in stack order.
    stacks: ``{(d, k): [L, N, d, k]}`` float32 merged fine-tunes.
    base: every tensor of the base by HF name (float32 where fine-tuned).
    config: the base's HF config.
  """
  model_dir: str
  adapters: List[str]
  ranks: np.ndarray
  names: List[str]
  groups: Dict[Tuple[int, int], List[str]]
  stacks: Dict[Tuple[int, int], np.ndarray]
  base: Layers
  config: dict

  @property
  def truth(self) -> Layers:
    return {n: self.base[n] for n in self.names}


def load_bench(adapter_dirs: Sequence[str], model_dir: str) -> Bench:
  """Merges every adapter into the base (float32, as
  :func:`detune_jax.io.peft.merge_adapter` does).

  Raises:
    ValueError: adapters that target different matrices, or an adapter
      whose targets have different ranks.
  """
  base_files = ModelFiles(model_dir)
  base = {n: np.asarray(base_files.read(n)) for n in base_files.names}
  factors = [peft.adapter_factors(a, base_files) for a in adapter_dirs]
  names = sorted(factors[0])
  ranks = []
  for path, f in zip(adapter_dirs, factors):
    if sorted(f) != names:
      raise ValueError(f"{path}: targets other matrices than "
                       f"{adapter_dirs[0]}")
    r = {int(x.rank) for x in f.values()}
    if len(r) != 1:
      raise ValueError(f"{path}: targets of different ranks {sorted(r)}")
    ranks.append(r.pop())
  groups: Dict[Tuple[int, int], List[str]] = {}
  for n in names:
    base[n] = base[n].astype(np.float32)
    groups.setdefault(tuple(base[n].shape), []).append(n)
  stacks = {}
  for shape, group in groups.items():
    S = np.empty((len(group), len(factors)) + shape, np.float32)
    for l, n in enumerate(group):
      for j, f in enumerate(factors):
        x = f[n]
        S[l, j] = base[n] + np.float32(x.scale) * (x.B @ x.A)
    stacks[shape] = S
  with open(os.path.join(model_dir, "config.json")) as fh:
    config = json.load(fh)
  return Bench(model_dir, [os.path.basename(os.path.normpath(a))
                           for a in adapter_dirs], np.asarray(ranks), names,
               groups, stacks, base, config)


def release(bench: Bench, dtype) -> Bench:
  """The bench as a release in ``dtype`` (e.g. bfloat16) ships: the base
  rounded to ``dtype`` (every float tensor; it is then the truth), and each
  fine-tune its update added to that base and rounded, ``round(round(W) +
  s B A)``. Stacks are in ``dtype``, the base float32 on ``dtype``'s grid."""
  dtype = np.dtype(dtype)
  base = {n: (t.astype(dtype).astype(np.float32)
              if np.issubdtype(t.dtype, np.floating) else t)
          for n, t in bench.base.items()}
  stacks = {}
  for shape, group in bench.groups.items():
    W = np.stack([bench.base[n] for n in group])[:, None]
    R = np.stack([base[n] for n in group])[:, None]
    stacks[shape] = (R + (bench.stacks[shape] - W)).astype(dtype)
  return bench._replace(base=base, stacks=stacks)


def finetune_layers(bench: Bench, j: int) -> Layers:
  """Fine-tune ``j``'s matrices (float32)."""
  return {n: np.asarray(bench.stacks[s][l, j], np.float32)
          for s, group in bench.groups.items() for l, n in enumerate(group)}


def recover_layers(bench: Bench, idx: Sequence[int], method: str, *,
                   steps: int = 300, seed: int = 0,
                   schedule: Optional[RankSchedule] = None
                   ) -> Tuple[Layers, float]:
  """Recovers the fine-tuned matrices from fine-tunes ``idx`` of the bench.

  Args:
    bench: the bench (low-precision stacks, a :func:`release`, take the
      solvers' dtype-aware step as the pipeline does).
    idx: which fine-tunes (columns).
    method: ``"Mean-LoRA"``, ``"Spectral DeTuning"`` (the paper's
      algorithm: float32, no dtype-aware step), ``"auto"``, or a name of
      the solver registry.
    steps: iterative solvers' steps.
    seed: their seed.
    schedule: Spectral DeTuning's rank schedule (default :class:`RankSchedule`).

  Returns:
    ``({name: float32 [d, k]}, seconds)``.
  """
  solver = _SOLVER_OF.get(method, method)
  idx = np.asarray(idx)
  ranks = bench.ranks[idx]
  rank = int(ranks[0]) if (ranks == ranks[0]).all() else tuple(
      int(r) for r in ranks)
  options = {} if schedule is None else {"schedule": schedule}
  if method == SPECTRAL_DETUNING:
    # The paper's algorithm knows nothing of the release's dtype: it runs in
    # float32 on the upcast weights, without this project's grid step.
    options["dtype_aware"] = False
  t0 = time.time()
  out = {}
  for shape, group in bench.groups.items():
    W, _ = registry.solve(bench.stacks[shape][:, idx], rank, solver=solver,
                          steps=steps, seed=seed, **options)
    W = np.asarray(W, np.float32)
    out.update({n: W[l] for l, n in enumerate(group)})
  return out, time.time() - t0


class Scorer:
  """Scores replaced matrices of the base against the base.

  Args:
    bench: the bench (the base, its config and tokenizer).
    texts: the SBERT distance's sentences.
    batch_size: sentences per batch.
  """

  def __init__(self, bench: Bench, texts: Sequence[str], *,
               batch_size: int = 32):
    self.bench = bench
    self.texts = list(texts)
    self._encoder = bert.SentenceEncoder(
        bert.from_tensors(bench.base, bench.config), bench.model_dir,
        batch_size=batch_size)
    self.reference = self._encoder(self.texts)

  def layer_w_errors(self, layers: Layers) -> np.ndarray:
    """``[len(names)]`` log10 MSE of each fine-tuned matrix."""
    return np.asarray([float(metrics.layer_w_error(layers[n],
                                                   self.bench.base[n]))
                       for n in self.bench.names])

  def w_error(self, layers: Layers) -> float:
    """W-Error: the mean over the fine-tuned matrices of log10 MSE."""
    return float(np.mean(self.layer_w_errors(layers)))

  def bit_exact(self, layers: Layers, dtype) -> float:
    """Share of the fine-tuned weights that equal the base's in ``dtype``
    bit for bit (``layers`` rounded to ``dtype``)."""
    same = total = 0
    for n in self.bench.names:
      a = np.asarray(layers[n], np.float32).astype(dtype)
      b = self.bench.base[n].astype(dtype)
      same += int((a.view(np.uint8).reshape(a.size, -1)
                   == b.view(np.uint8).reshape(b.size, -1)).all(1).sum())
      total += a.size
    return same / total

  def embed(self, layers: Layers) -> np.ndarray:
    """Sentence embeddings of the base with ``layers`` in place."""
    tensors = dict(self.bench.base)
    tensors.update(layers)
    self._encoder.use(bert.from_tensors(tensors, self.bench.config))
    return self._encoder(self.texts)

  def sbert(self, layers: Layers) -> float:
    """Mean over the texts of ``log10(1 - cos + eps)`` to the base."""
    return sbert.sbert_distance(self.reference,
                                self.embed(layers)).mean_log10


def random_subsets(num: int, n: int, count: int, seed: int = 0
                   ) -> List[List[int]]:
  """``count`` random subsets of ``n`` of ``range(num)``, each sorted.

  >>> random_subsets(15, 5, 2)
  [[3, 4, 6, 7, 9], [7, 8, 9, 11, 13]]
  """
  rng = np.random.default_rng(seed)
  return [sorted(int(i) for i in rng.choice(num, n, replace=False))
          for _ in range(count)]


BF16 = np.dtype(ml_dtypes.bfloat16)


def score_subsets(bench: Bench, scorer: Scorer, subsets: Sequence[Sequence[int]],
                  methods: Sequence[str] = METHODS, *,
                  steps: int = 300, seed: int = 0,
                  extra: Sequence[Tuple[str, str, RankSchedule]] = (),
                  log=print) -> dict:
  """Every method's scores on every subset of fine-tunes.

  Args:
    bench: the bench.
    scorer: its scorer.
    subsets: lists of fine-tune indices.
    methods: rows (:data:`METHODS`).
    steps: iterative solvers' steps.
    seed: their seed.
    extra: more rows ``(row name, solver or method, rank schedule)`` scored
      on W-Error only (e.g. Spectral DeTuning without the scheduler).
    log: called with one line per subset.

  Returns:
    ``{row: {"w_error": [...], "sbert": [...], "layer_w_error": [[...]],
    "bit_exact": [...], "seconds": [...]}}``, one entry per subset
    (``bit_exact`` only for low-precision releases; LoRA-FT's entries are
    the means over the subset's fine-tunes, its ``seconds`` 0).
  """
  low = next(iter(bench.stacks.values())).dtype
  low = low if low.itemsize < 4 else None
  rows = {m: {"w_error": [], "sbert": [], "layer_w_error": [],
              "bit_exact": [], "seconds": []}
          for m in list(methods) + [e[0] for e in extra]}
  cache: Dict[int, Tuple[np.ndarray, float]] = {}

  def add(row, layers, seconds, semantic=True):
    per_layer = scorer.layer_w_errors(layers)
    r = rows[row]
    r["layer_w_error"].append(per_layer.tolist())
    r["w_error"].append(float(per_layer.mean()))
    r["seconds"].append(seconds)
    if semantic:
      r["sbert"].append(scorer.sbert(layers))
    if low is not None:
      r["bit_exact"].append(scorer.bit_exact(layers, low))

  for s, idx in enumerate(subsets):
    for m in methods:
      if m == LORA_FT:
        for j in idx:
          if j not in cache:
            layers = finetune_layers(bench, j)
            cache[j] = (scorer.layer_w_errors(layers), scorer.sbert(layers))
        per_layer = np.mean([cache[j][0] for j in idx], 0)
        r = rows[m]
        r["layer_w_error"].append(per_layer.tolist())
        r["w_error"].append(float(np.mean([cache[j][0].mean() for j in idx])))
        r["sbert"].append(float(np.mean([cache[j][1] for j in idx])))
        r["seconds"].append(0.0)
        continue
      layers, seconds = recover_layers(bench, idx, m, steps=steps,
                                       seed=seed)
      add(m, layers, seconds)
    for row, method, schedule in extra:
      layers, seconds = recover_layers(bench, idx, method,
                                       steps=steps, seed=seed,
                                       schedule=schedule)
      add(row, layers, seconds, semantic=False)
    log(f"  subset {s + 1}/{len(subsets)} {list(idx)}: " + "  ".join(
        f"{m} {rows[m]['w_error'][-1]:.2f}" for m in rows))
  return rows


def summary(rows: dict) -> Dict[str, dict]:
  """Mean and standard deviation (over subsets, ``ddof=0``) of each row's
  scores: ``{row: {"w_error": (mean, std), "sbert": ..., "bit_exact": ...}}``
  (keys only where the row has values)."""
  out = {}
  for m, r in rows.items():
    out[m] = {k: (float(np.mean(r[k])), float(np.std(r[k])))
              for k in ("w_error", "sbert", "bit_exact", "seconds") if r[k]}
  return out


def markdown_table(rows: dict, bit_exact: bool = False) -> str:
  """The summary as a markdown table (paper Table 2's form).

  >>> rows = {"Mean-LoRA": {"w_error": [-5.0, -6.0], "sbert": [-1.0, -1.0],
  ...                       "bit_exact": [], "seconds": [0.1, 0.1]}}
  >>> print(markdown_table(rows))
  | method | W-Error | SBERT (log10) | seconds per subset |
  |---|---|---|---|
  | Mean-LoRA | -5.50 ± 0.50 | -1.00 ± 0.00 | 0.1 |
  """
  s = summary(rows)
  head = "| method | W-Error | SBERT (log10) |"
  if bit_exact:
    head += " bit-exact |"
  lines = [head + " seconds per subset |",
           "|---" * (head.count("|")) + "|"]
  for m, v in s.items():
    def cell(k, fmt="{:.2f} ± {:.2f}"):
      return fmt.format(*v[k]) if k in v else "—"
    line = f"| {m} | {cell('w_error')} | {cell('sbert')} |"
    if bit_exact:
      line += f" {cell('bit_exact', '{:.1%} ± {:.1%}')} |"
    lines.append(line + f" {v['seconds'][0]:.1f} |")
  return "\n".join(lines)
