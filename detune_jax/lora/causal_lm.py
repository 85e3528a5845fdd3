"""LoRA fine-tuning of the Llama/Mistral port on instruction pairs, with
optax: supervised fine-tuning as the paper's Mistral SFT stage does it.

Each example is a question rendered through the model's chat template and
its answer ending in the EOS token; the loss is the next-token
cross-entropy on the answer's tokens only. The base weights stay frozen and
an adapter (:mod:`~detune_jax.lora.adapter`, e.g. on
:data:`~detune_jax.models.llama.ATTENTION_TARGETS`) trains with AdamW; the
whole fine-tune (batches drawn with replacement, the steps, the held-out
loss before and after) is one jitted program, compiled once for every seed
and data subset of the same size.
"""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from detune_jax.lora.adapter import (Adapter, LoraSettings, apply_adapter,
                                     init_adapter)
from detune_jax.lora.instructions import Pair
from detune_jax.models import checkpoint, generation, llama


class LMExamples(NamedTuple):
  """Right-padded token sequences ``[N, T]``.

  Attributes:
    ids: prompt then answer token ids, padded with the pad id.
    mask: 1 on tokens, 0 on padding.
    targets: 1 on the tokens the loss predicts (the answer and its EOS).
  """
  ids: np.ndarray
  mask: np.ndarray
  targets: np.ndarray


class LMResult(NamedTuple):
  """A trained adapter and what it did.

  Attributes:
    adapter: by HF weight name.
    losses: ``[steps]`` training loss per step.
    held_out_before: answer cross-entropy of the base on held-out pairs.
    held_out_after: the same with the adapter.
  """
  adapter: Adapter
  losses: np.ndarray
  held_out_before: float
  held_out_after: float


def encode(generator: generation.TextGenerator, pairs: Sequence[Pair],
           max_length: int = 80) -> LMExamples:
  """Tokenises ``pairs``: the question through the chat template, the
  answer as plain text then the model's EOS; answers are cut so that every
  sequence fits ``max_length`` (the EOS kept)."""
  cfg = generator.model.config
  if not cfg.eos_token_id:
    raise ValueError("the model's config has no eos_token_id")
  eos = cfg.eos_token_id[0]
  pad = cfg.pad_token_id if cfg.pad_token_id is not None else eos
  prompts = generator.encode([p.question for p in pairs], chat=True)
  answers = [e.ids for e in generator.tokenizer.encode_batch(
      [p.answer for p in pairs], add_special_tokens=False)]
  n = len(pairs)
  ids = np.full((n, max_length), pad, np.int32)
  mask = np.zeros((n, max_length), np.int32)
  targets = np.zeros((n, max_length), np.int32)
  for i, (q, a) in enumerate(zip(prompts, answers)):
    room = max_length - len(q) - 1
    if room < 1:
      raise ValueError(f"the prompt of {pairs[i].name!r} alone has {len(q)} "
                       f"tokens; max_length is {max_length}")
    seq = q + a[:room] + [eos]
    ids[i, :len(seq)] = seq
    mask[i, :len(seq)] = 1
    targets[i, len(q):len(seq)] = 1
  return LMExamples(ids, mask, targets)


def answer_loss(model: llama.Llama, ids, mask, targets) -> jax.Array:
  """Mean next-token cross-entropy over the target tokens."""
  h, _ = model.hidden(ids, attention_mask=mask)
  logits = model.logits(h[:, :-1])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
  w = targets[:, 1:].astype(jnp.float32)
  return (ce * w).sum() / jnp.maximum(w.sum(), 1.0)


def _fit(fn: checkpoint.Functional, settings: LoraSettings, tensors,
         data: LMExamples, train_index, held_out: LMExamples, key):
  k_adapter, k_batches = jax.random.split(key)
  adapter = init_adapter(k_adapter, tensors, settings)
  picks = jax.random.randint(k_batches, (settings.steps, settings.batch_size),
                             0, train_index.shape[0])
  opt = optax.adamw(settings.learning_rate,
                    weight_decay=settings.weight_decay)

  def loss_fn(adapter, ex: LMExamples):
    return answer_loss(fn.module(apply_adapter(tensors, adapter, settings)),
                       *ex)

  def step(carry, pick):
    adapter, opt_state = carry
    idx = train_index[pick]
    batch = LMExamples(*(x[idx] for x in data))
    loss, grads = jax.value_and_grad(loss_fn)(adapter, batch)
    updates, opt_state = opt.update(grads, opt_state, adapter)
    return (optax.apply_updates(adapter, updates), opt_state), loss

  before = loss_fn(adapter, held_out)  # b = 0: the base itself
  (adapter, _), losses = jax.lax.scan(step, (adapter, opt.init(adapter)),
                                      picks)
  return adapter, losses, before, loss_fn(adapter, held_out)


@functools.lru_cache(maxsize=4)
def _program(graphdef, paths, settings: LoraSettings):
  fn = checkpoint.Functional(graphdef, paths, {})
  return jax.jit(functools.partial(_fit, fn, settings))


def train(model: llama.Llama, settings: LoraSettings, data: LMExamples,
          train_index: np.ndarray, held_out: LMExamples) -> LMResult:
  """LoRA-fine-tunes ``model`` on ``data[train_index]``.

  Args:
    model: the base (left unchanged).
    settings: LoRA and optimiser settings; ``settings.seed`` seeds the
      adapter's ``a`` and the batches. Targets match HF weight names
      (e.g. ``llama.ATTENTION_TARGETS``).
    data: every example (:func:`encode`).
    train_index: which of them this fine-tune trains on.
    held_out: examples it never sees, for the before/after loss.

  Returns:
    The :class:`LMResult`.
  """
  fn = checkpoint.functional(model, llama.NAME_TABLE)
  fit = _program(fn.graphdef, fn.paths, settings._replace(seed=0))
  as_jax = lambda ex: LMExamples(*(jnp.asarray(x, jnp.int32) for x in ex))
  adapter, losses, before, after = fit(
      fn.tensors, as_jax(data), jnp.asarray(train_index, jnp.int32),
      as_jax(held_out), jax.random.key(settings.seed))
  return LMResult(jax.device_get(adapter), np.asarray(losses),
                  float(before), float(after))


def losses_summary(results: List[LMResult]) -> dict:
  """Held-out answer loss before and after, per fine-tune (for a bench's
  JSON)."""
  return {"held_out_before": [r.held_out_before for r in results],
          "held_out_after": [r.held_out_after for r in results]}
