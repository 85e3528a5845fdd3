"""Fine-tuned layer detection (paper App. G).

A tensor that is bit-identical in all n models was not fine-tuned; one that
differs in any model was.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bits(a):
  """The bytes of an array (any dtype, bfloat16 included): equal arrays are
  equal bit for bit, nan payloads and signed zeros included."""
  a = np.ascontiguousarray(a)
  return a.reshape(-1).view(np.uint8)


def is_finetuned(tensors: Sequence) -> bool:
  """True when the versions of one tensor are not all bit-identical.

  Args:
    tensors: the same tensor from each model (numpy-compatible arrays, any
      dtype including bfloat16; memory-mapped arrays are read once).

  >>> import numpy as np
  >>> is_finetuned([np.ones(3), np.ones(3)]), is_finetuned([np.ones(3), np.zeros(3)])
  (False, True)
  """
  first = bits(np.asarray(tensors[0]))
  return any(not np.array_equal(first, bits(np.asarray(t))) for t in tensors[1:])
