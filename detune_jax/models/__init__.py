"""Flax NNX ports of the models the paper fine-tunes, loading HF checkpoints.

One file per family (:mod:`~detune_jax.models.bert`,
:mod:`~detune_jax.models.vit`, :mod:`~detune_jax.models.llama` for Llama and
Mistral) over shared blocks (:mod:`~detune_jax.models.layers`); each keeps
HF's parameter layouts and maps HF names through one table, so recovered or
LoRA-merged weights load as they are written
(:mod:`~detune_jax.models.checkpoint`). :mod:`~detune_jax.models.generation`
decodes text with the causal LM port.
"""
