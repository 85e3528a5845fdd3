"""The ViT activation distance (the paper's ViT semantic metric).

For layers ``i = 0 .. num_layers - 1`` (the embedding output and every block
but the last), the mean over a batch of ``1 - cos`` between the flattened
``hidden_states[i]`` of the reference and the candidate, summed over batches
and divided by their number, exactly as the official LoWRA Bench code
(``vit_inference.py``) computes it; the figure is the mean over layers.
"""

from __future__ import annotations

from typing import List, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class ActivationDistance(NamedTuple):
  per_layer: List[float]   # one per hidden state 0 .. num_layers - 1
  mean: float              # mean over the layers


def _cosine_distance(a, b):
  """``1 - cos`` per row, with torch's ``cosine_similarity`` epsilon."""
  a = a.reshape(a.shape[0], -1).astype(jnp.float32)
  b = b.reshape(b.shape[0], -1).astype(jnp.float32)
  denom = jnp.sqrt(jnp.maximum((a * a).sum(1) * (b * b).sum(1), 1e-16))
  return 1.0 - (a * b).sum(1) / denom


def activation_distance(reference: nnx.Module, candidate: nnx.Module,
                        images: np.ndarray,
                        batch_size: int = 64) -> ActivationDistance:
  """Activation distance of ``candidate`` to ``reference`` on ``images``.

  Args:
    reference, candidate: :class:`detune_jax.models.vit.ViT` ports of the
      same architecture.
    images: ``[N, channels, size, size]``, prepared
      (:func:`detune_jax.eval.load_images`).
    batch_size: as the official code (64); the last batch may be smaller
      and counts as one batch, as there.

  Returns:
    :class:`ActivationDistance`.
  """
  layers = len(reference.layers)
  graph_r, state_r = nnx.split(reference)
  graph_c, state_c = nnx.split(candidate)

  @jax.jit
  def batch_distances(state_r, state_c, x, valid):
    hr = nnx.merge(graph_r, state_r)(x)["hidden_states"]
    hc = nnx.merge(graph_c, state_c)(x)["hidden_states"]
    # Padding rows are left out of the batch mean.
    return jnp.stack([(_cosine_distance(hr[i], hc[i]) * valid).sum()
                      / valid.sum() for i in range(layers)])

  images = np.asarray(images, np.float32)
  if not len(images):
    raise ValueError("no images")
  batch_size = min(batch_size, len(images))
  total = np.zeros(layers)
  batches = 0
  for start in range(0, len(images), batch_size):
    x = images[start:start + batch_size]
    valid = np.zeros(batch_size, np.float32)
    valid[:len(x)] = 1
    if len(x) < batch_size:  # one compiled shape for every batch
      x = np.concatenate([x, np.repeat(x[:1], batch_size - len(x), 0)])
    total += np.asarray(batch_distances(state_r, state_c, x, valid))
    batches += 1
  per_layer = [float(v) for v in total / batches]
  return ActivationDistance(per_layer, float(np.mean(per_layer)))
