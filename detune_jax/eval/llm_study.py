"""The paper's Mistral experiment (Table 4, Fig. 2) on the LLM bench.

Spectral DeTuning undoes the LoRA SFT of Mistral-7B and the recovered model
writes what the base wrote: Table 4 reports W-Error and the SBERT distance
between the generations of the base and of each model, for LoRA-FT (the
fine-tuned models), Mean-LoRA (their average) and the recovery. Here the
same on SmolLM2-135M-Instruct and its shipped fine-tunes
(:mod:`detune_jax.lora.llm_bench`), on held-out prompts the fine-tunes never
saw, with the paper's decoding (50 new tokens, temperature 0.7, top-k 50,
top-p 0.95), every model from the same seed per prompt.

:class:`GenerationScorer` is a :class:`~detune_jax.eval.bench_study.Scorer`
whose embedding of a model is the all-MiniLM-L6-v2 embedding of its
generations, so W-Error and bit-exact scoring are shared with the MiniLM
study.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from detune_jax.eval import bench_study, sbert
from detune_jax.models import bert, generation, llama

Layers = bench_study.Layers


class GenerationScorer(bench_study.Scorer):
  """Scores replaced matrices of an LLM by the generations they give.

  Args:
    bench: the bench (base, config, tokenizer and chat template).
    prompts: the prompts (held out from every fine-tune).
    sbert_dir: the sentence embedder (all-MiniLM-L6-v2).
    max_new_tokens: tokens per continuation.
    sampling: decoding (default the paper's).
    seed: the randomness, the same for every model.
    chat: prompts through the chat template.
    batch_size: prompts per compiled call.
  """

  def __init__(self, bench: bench_study.Bench, prompts: Sequence[str], *,
               sbert_dir: str, max_new_tokens: int = 50,
               sampling: generation.Sampling = generation.PAPER,
               seed: int = 0, chat: bool = True, batch_size: int = 8):
    # Not the BERT scorer's set-up: only ``bench`` and ``reference`` are
    # shared state, and ``embed`` is this class's own.
    self.bench = bench
    self.texts = list(prompts)
    self.options = dict(max_new_tokens=max_new_tokens, sampling=sampling,
                        seed=seed, chat=chat)
    self._generator = generation.TextGenerator(
        llama.from_tensors(bench.base, bench.config), bench.model_dir,
        batch_size=batch_size)
    self._embedder = bert.SentenceEncoder(bert.load(sbert_dir), sbert_dir)
    self.reference_texts = self._generator.generate(self.texts,
                                                    **self.options)
    self.reference = self._embedder(self.reference_texts)

  def generate(self, layers: Layers, seed: Optional[int] = None
               ) -> List[str]:
    """The continuations of the base with ``layers`` in place."""
    tensors = dict(self.bench.base)
    tensors.update(layers)
    self._generator.use(llama.from_tensors(tensors, self.bench.config))
    options = dict(self.options)
    if seed is not None:
      options["seed"] = seed
    return self._generator.generate(self.texts, **options)

  def embed(self, layers: Layers) -> np.ndarray:
    return self._embedder(self.generate(layers))

  def score_texts(self, texts: Sequence[str]) -> float:
    """Mean ``log10(1 - cos + eps)`` of ``texts`` to the base's, prompt by
    prompt."""
    return sbert.sbert_distance(self.reference,
                                self._embedder(list(texts))).mean_log10


def run_table(bench: bench_study.Bench, scorer: GenerationScorer, *,
              n_small: int = 3, small_subsets: int = 3, steps: int = 300,
              log=print) -> Dict:
  """Table 4 in miniature, and the generations behind it.

  Rows: LoRA-FT (mean over every fine-tune), Mean-LoRA, Spectral DeTuning
  and ``auto`` from all ``N`` fine-tunes; ``auto`` and Spectral DeTuning
  from ``small_subsets`` random subsets of ``n_small``; and the base itself
  decoded from another seed (how far sampling alone moves the texts).

  Returns:
    ``{"rows": {row: {"w_error": [...], "sbert": [...], "seconds":
    [...]}}, "texts": {row: [the first model's continuations]},
    "reference_texts": [...], "prompts": [...]}``.
  """
  n = len(bench.adapters)
  rows: Dict[str, Dict[str, list]] = {}
  texts: Dict[str, List[str]] = {}

  def add(row, layers, seconds):
    generated = scorer.generate(layers)
    r = rows.setdefault(row, {"w_error": [], "sbert": [], "seconds": []})
    r["w_error"].append(scorer.w_error(layers))
    r["sbert"].append(scorer.score_texts(generated))
    r["seconds"].append(seconds)
    texts.setdefault(row, generated)
    log(f"  {row}: W-Error {r['w_error'][-1]:.2f}, SBERT "
        f"{r['sbert'][-1]:.2f} ({seconds:.0f}s to recover)")

  for j in range(n):
    add(bench_study.LORA_FT, bench_study.finetune_layers(bench, j), 0.0)
  everything = list(range(n))
  for method in (bench_study.MEAN_LORA, bench_study.SPECTRAL_DETUNING,
                 bench_study.AUTO):
    layers, seconds = bench_study.recover_layers(bench, everything, method,
                                                 steps=steps)
    add(f"{method} (n={n})", layers, seconds)
  for idx in bench_study.random_subsets(n, n_small, small_subsets):
    for method in (bench_study.SPECTRAL_DETUNING, bench_study.AUTO):
      layers, seconds = bench_study.recover_layers(bench, idx, method,
                                                   steps=steps)
      add(f"{method} (n={n_small})", layers, seconds)
  other = scorer.generate({}, seed=scorer.options["seed"] + 1)
  rows["Base, another seed"] = {"w_error": [], "seconds": [0.0],
                                "sbert": [scorer.score_texts(other)]}
  texts["Base, another seed"] = other
  return {"rows": rows, "texts": texts,
          "reference_texts": scorer.reference_texts,
          "prompts": scorer.texts}


def table_markdown(result: Dict) -> str:
  """The rows as a markdown table: mean ± std where a row has several."""
  def cell(values):
    if not values:
      return "—"
    if len(values) == 1:
      return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}"
  lines = ["| | W-Error | SBERT of generations (log10) | models |",
           "|---|---|---|---|"]
  for row, r in result["rows"].items():
    lines.append(f"| {row} | {cell(r['w_error'])} | {cell(r['sbert'])} | "
                 f"{len(r['sbert'])} |")
  return "\n".join(lines)


def generations_markdown(result: Dict, prompts: Sequence[int] = (0, 1, 2),
                         rows: Optional[Sequence[str]] = None) -> str:
  """Side-by-side continuations of a few prompts (the paper's Fig. 2)."""
  rows = rows or ["Base"] + list(result["texts"])
  out = []
  for p in [p for p in prompts if p < len(result["prompts"])]:
    out.append(f"**Prompt:** {result['prompts'][p]}\n")
    out.append("| model | continuation |\n|---|---|")
    for row in rows:
      text = (result["reference_texts"][p] if row == "Base"
              else result["texts"][row][p])
      text = " ".join(text.split()).replace("|", "\\|")
      out.append(f"| {row} | {text} |")
    out.append("")
  return "\n".join(out)
