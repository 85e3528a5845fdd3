"""Flax NNX ports of the models the paper fine-tunes, loading HF checkpoints.

One file per family (:mod:`~detune_jax.models.bert`,
:mod:`~detune_jax.models.vit`) over shared blocks
(:mod:`~detune_jax.models.layers`); each keeps HF's parameter layouts and maps
HF names through one table, so recovered or LoRA-merged weights load as they
are written (:mod:`~detune_jax.models.checkpoint`).
"""
