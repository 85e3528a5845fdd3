"""Batches of token ids padded to a few fixed shapes.

A jitted model compiles once per input shape. Padding every batch to
``batch_size`` rows and its length up to the next bucket bounds the compiles
to a few (19 buckets up to 512 tokens, fewer used by most texts), whatever
the texts; sorting by length first keeps the padding small.
"""

from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import numpy as np


def buckets(max_length: int, smallest: int = 16) -> List[int]:
  """Bucket lengths: steps of a quarter of the enclosing power of two (at
  least 8), so no batch is padded by more than about a quarter, then
  ``max_length``.

  >>> buckets(128)
  [16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128]
  >>> buckets(100)[-3:]
  [80, 96, 100]
  """
  out, b = [], smallest
  while b < max_length:
    out.append(b)
    b += max(8, (1 << (b.bit_length() - 1)) // 4)
  return out + [max_length]


class Batcher:
  """Groups sequences into fixed-shape, padded batches."""

  def __init__(self, batch_size: int, max_length: int, pad_id: int = 0):
    self.batch_size = batch_size
    self.buckets = buckets(max_length)
    self.pad_id = pad_id

  def bucket(self, length: int) -> int:
    for b in self.buckets:
      if length <= b:
        return b
    raise ValueError(f"sequence of {length} tokens over the limit "
                     f"{self.buckets[-1]}")

  def batches(self, seqs: Sequence[Sequence[int]]
              ) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields ``(index, ids [batch_size, T], mask [batch_size, T])``.

    ``index`` holds the positions in ``seqs`` of the first ``len(index)``
    rows; the remaining rows are padding (one token unmasked, so no row of
    the attention is empty).
    """
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), self.batch_size):
      index = np.asarray(order[start:start + self.batch_size])
      t = self.bucket(max(len(seqs[i]) for i in index))
      ids = np.full((self.batch_size, t), self.pad_id, np.int32)
      mask = np.zeros((self.batch_size, t), np.int32)
      mask[:, 0] = 1
      for row, i in enumerate(index):
        ids[row, :len(seqs[i])] = seqs[i]
        mask[row, :len(seqs[i])] = 1
      yield index, ids, mask
