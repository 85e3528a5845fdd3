"""An instruction data set from real text that ships with Python: questions
about the standard library answered by its own docstrings.

Each pair asks what a public function or class of a fixed list of stdlib
modules does (three phrasings, picked by the name) and answers with the
first sentences of its docstring. The set is deterministic for a Python
version (the docstrings are CPython's; the project pins 3.11). A fixed
tenth of the names, chosen by a hash of the name, is held out: the
fine-tunes never train on it, and the evaluation prompts come from it.

>>> pairs = load()
>>> len(pairs) > 300, pairs[0].name
(True, 'base64.a85decode')
>>> train, held_out = split(pairs)
>>> set(p.name for p in train).isdisjoint(p.name for p in held_out)
True
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from typing import List, NamedTuple, Sequence, Tuple

import numpy as np

MODULES = (
    "base64", "bisect", "calendar", "collections", "colorsys", "copy", "csv",
    "difflib", "fnmatch", "functools", "glob", "gzip", "hashlib", "heapq",
    "html", "itertools", "json", "keyword", "math", "operator", "os.path",
    "pathlib", "pprint", "random", "re", "secrets", "shlex", "shutil",
    "statistics", "string", "textwrap", "unicodedata", "urllib.parse", "uuid",
    "zlib")

PHRASINGS = ("What does `{}` do?", "Explain `{}` in one sentence.",
             "In Python, what is `{}` for?")

# Answers are cut after the sentence that takes them past this many
# characters: the sequences stay short enough to train on CPUs.
ANSWER_CHARS = 120
HELD_OUT_FRACTION = 0.1


class Pair(NamedTuple):
  """One instruction: the qualified name asked about, the question, the
  answer."""
  name: str
  question: str
  answer: str


def _answer(doc: str) -> str:
  para = " ".join(doc.split("\n\n")[0].split())
  sentences = re.split(r"(?<=[.!?])\s+", para)
  out = ""
  for s in sentences:
    out = f"{out} {s}".strip()
    if len(out) >= ANSWER_CHARS:
      break
  if not out.endswith((".", "!", "?")):
    out += "."
  return out


def _digest(name: str) -> int:
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


def load(modules: Sequence[str] = MODULES) -> List[Pair]:
  """Every pair, sorted by name.

  Skips names without a docstring, docstrings whose first paragraph is a
  signature or shorter than 25 characters, and objects a module only
  re-exports from another (asked about where they are defined).
  """
  out = []
  for m in modules:
    mod = importlib.import_module(m)
    for name in sorted(dir(mod)):
      obj = getattr(mod, name)
      if name.startswith("_") or not (inspect.isfunction(obj) or
                                      inspect.isbuiltin(obj) or
                                      inspect.isclass(obj)):
        continue
      home = getattr(obj, "__module__", None) or m
      if inspect.isclass(obj) and not home.lstrip("_").startswith(
          m.split(".")[0]):
        continue
      doc = inspect.getdoc(obj)
      if not doc:
        continue
      answer = _answer(doc)
      if len(answer) < 25 or re.match(r"^[\w.]+\(.*\)", answer):
        continue
      qualified = f"{m}.{name}"
      phrasing = PHRASINGS[_digest(qualified) % len(PHRASINGS)]
      out.append(Pair(qualified, phrasing.format(qualified), answer))
  return out


def split(pairs: Sequence[Pair],
          fraction: float = HELD_OUT_FRACTION) -> Tuple[List[Pair],
                                                        List[Pair]]:
  """``(train pool, held out)``: the held-out names are the ``fraction``
  with the smallest hash, so the split does not move when names are added
  elsewhere."""
  ranked = sorted(pairs, key=lambda p: _digest("held-out:" + p.name))
  k = int(round(fraction * len(pairs)))
  held = {p.name for p in ranked[:k]}
  return ([p for p in pairs if p.name not in held],
          [p for p in pairs if p.name in held])


def subset_index(size: int, seed: int, fraction: float = 0.8) -> np.ndarray:
  """Sorted indices of a random ``fraction`` of ``size`` items (fine-tune
  ``seed``'s own data)."""
  rng = np.random.default_rng(seed)
  return np.sort(rng.permutation(size)[:int(round(fraction * size))])


def subset(pool: Sequence[Pair], seed: int,
           fraction: float = 0.8) -> List[Pair]:
  """The pairs of :func:`subset_index`."""
  return [pool[i] for i in subset_index(len(pool), seed, fraction)]
