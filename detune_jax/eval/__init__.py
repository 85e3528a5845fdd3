"""Behavioural metrics of recovered models, as the paper measures them.

Pure functions returning named figures, built on the Flax ports in
:mod:`detune_jax.models`: the SBERT distance of texts
(:func:`sbert_distance`) and the ViT activation distance
(:func:`activation_distance`), both computed as the official LoWRA Bench code
computes them.
"""

from detune_jax.eval.activations import ActivationDistance, activation_distance
from detune_jax.eval.images import (Preprocessing, default_images, load_images,
                                    preprocess)
from detune_jax.eval.sbert import SbertDistance, sbert_distance

__all__ = ["ActivationDistance", "activation_distance", "Preprocessing",
           "default_images", "load_images", "preprocess", "SbertDistance",
           "sbert_distance"]
