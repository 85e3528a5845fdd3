"""Images for the ViT activation distance, prepared as the LoWRA Bench code.

The official evaluation resizes the shorter side to the processor's size,
centre-crops a square of that size, scales to [0, 1] and normalises with the
processor's mean and std (torchvision's ``Resize``, ``CenterCrop``,
``ToTensor``, ``Normalize``). The settings come from the model directory's
``preprocessor_config.json`` when it has one, the ViT defaults otherwise.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple, Optional, Sequence

import numpy as np

from detune_jax.io.errors import BadInputError

SUFFIXES = (".png", ".jpg", ".jpeg")


class Preprocessing(NamedTuple):
  size: int = 224
  mean: Sequence[float] = (0.5, 0.5, 0.5)
  std: Sequence[float] = (0.5, 0.5, 0.5)

  @classmethod
  def from_model_dir(cls, model_dir: Optional[str]) -> "Preprocessing":
    """From ``preprocessor_config.json`` in ``model_dir``, if there is one."""
    path = os.path.join(model_dir or "", "preprocessor_config.json")
    if not model_dir or not os.path.exists(path):
      return cls()
    try:
      with open(path) as f:
        cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise BadInputError(path, f"unreadable: {e}") from None
    size = cfg.get("size", cls().size)
    if isinstance(size, dict):
      size = size.get("height", size.get("shortest_edge", cls().size))
    return cls(int(size), tuple(cfg.get("image_mean", cls().mean)),
               tuple(cfg.get("image_std", cls().std)))


def preprocess(image, prep: Preprocessing = Preprocessing()) -> np.ndarray:
  """One PIL image -> ``[3, size, size]`` float32, normalised."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = image.convert("RGB")
  w, h = image.size
  s = prep.size
  # Shorter side to s, the other in proportion (torchvision's int Resize).
  if w <= h:
    new = (s, int(s * h / w))
  else:
    new = (int(s * w / h), s)
  image = image.resize(new, Image.BILINEAR)
  left = int(round((new[0] - s) / 2.0))
  top = int(round((new[1] - s) / 2.0))
  image = image.crop((left, top, left + s, top + s))
  x = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0
  mean = np.asarray(prep.mean, np.float32)[:, None, None]
  std = np.asarray(prep.std, np.float32)[:, None, None]
  return (x - mean) / std


def load_images(folder: str, prep: Preprocessing = Preprocessing(),
                limit: Optional[int] = None) -> np.ndarray:
  """Every PNG/JPEG under ``folder`` (sorted by path), ``[N, 3, s, s]``."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(folder):
    raise BadInputError(folder, "no such folder of images")
  paths = sorted(os.path.join(root, f) for root, _, files in os.walk(folder)
                 for f in files if f.lower().endswith(SUFFIXES))
  if not paths:
    raise BadInputError(folder, f"no images ({', '.join(SUFFIXES)})")
  out = []
  for path in paths[:limit]:
    try:
      with Image.open(path) as image:
        out.append(preprocess(image, prep))
    except (OSError, UnidentifiedImageError, ValueError) as e:
      raise BadInputError(path, f"unreadable image: {e}") from None
  return np.stack(out)


def default_images(n: int = 64, prep: Preprocessing = Preprocessing(),
                   seed: int = 0) -> np.ndarray:
  """A built-in, deterministic set of ``n`` images ``[n, 3, s, s]``.

  Smooth colour gradients, stripes and blobs with a little noise: not
  natural images, but enough structure to drive every layer, and the same
  on every machine.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:256, 0:256] / 256.0
  out = []
  for _ in range(n):
    f = rng.uniform(1, 8, size=3)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(.1, .4)
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    chans = [0.5 + 0.5 * np.sin(2 * np.pi * f[c] * (xx * np.cos(phase[c])
                                                    + yy * np.sin(phase[c])))
             for c in range(3)]
    img = np.stack(chans, -1) * 0.7 + blob[..., None] * rng.uniform(0, 1, 3) * 0.3
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    out.append(preprocess(Image.fromarray((img * 255).astype(np.uint8)), prep))
  return np.stack(out)
