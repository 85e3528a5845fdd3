"""The SBERT distance between two sets of texts (the paper's text metric).

Per text, ``d = 1 - cos(e_ref, e_cand)`` with the cosine clipped to
``[-1, 1]``, between the all-MiniLM-L6-v2 sentence embeddings of the two
texts (or of one text under two encoders); reported as the mean ``d`` and
the mean of ``log10(d + eps)`` with ``eps`` the float64 machine epsilon, as
the official LoWRA Bench code (``run_sbert_similarity.py``) reports the
paper's number.

>>> e = np.eye(3, dtype=np.float32)
>>> round(sbert_distance(e, e).mean_log10, 2)  # the floor: log10(eps)
-15.65
>>> float(sbert_distance(e, e[::-1]).distances[0])
1.0
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

EPS = float(np.finfo(np.float64).eps)


class SbertDistance(NamedTuple):
  """Per-text distances and their two summaries."""
  distances: np.ndarray   # [texts], 1 - cos, in [0, 2]
  mean: float             # mean distance
  mean_log10: float       # mean of log10(d + eps): the paper's figure


def sbert_distance(reference: np.ndarray, candidate: np.ndarray,
                   eps: float = EPS) -> SbertDistance:
  """SBERT distance between row-aligned embeddings ``[texts, dim]``.

  Args:
    reference: embeddings of the reference texts (or the reference model's).
    candidate: embeddings of the candidate texts, row for row.
    eps: added before the log (float64 machine epsilon, as the official
      code).

  Returns:
    :class:`SbertDistance`.
  """
  # float32 throughout, as torch's cosine_similarity on float32 embeddings:
  # near d = 0 the figure is set by float32 rounding, and matching it keeps
  # the numbers comparable with the paper's.
  ref = np.asarray(reference, np.float32)
  cand = np.asarray(candidate, np.float32)
  if ref.shape != cand.shape or ref.ndim != 2 or not len(ref):
    raise ValueError(f"embeddings of shapes {ref.shape} and {cand.shape}: "
                     "expected the same non-empty [texts, dim]")
  norms = np.sqrt(np.maximum((ref * ref).sum(1) * (cand * cand).sum(1),
                             np.float32(1e-16)))
  cos = np.clip((ref * cand).sum(1) / norms, -1.0, 1.0)
  d = (np.float32(1.0) - cos).astype(np.float64)
  return SbertDistance(d, float(d.mean()), float(np.log10(d + eps).mean()))
