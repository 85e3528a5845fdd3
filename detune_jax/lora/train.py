"""LoRA fine-tuning of the BERT port on a classification task, with optax.

The base weights stay frozen; an adapter (:mod:`~detune_jax.lora.adapter`)
and a linear head on the mask-mean-pooled last hidden state train with
AdamW. The whole fine-tune (batches drawn with replacement from the
fine-tune's own examples, the steps, the held-out evaluation) is one jitted
program, so :func:`train_many` runs several fine-tunes of one task as one
``jax.vmap`` over their seeds and data subsets.

Each fine-tune also reports an honest "before": the same head trained alone
on the frozen base (same initial head, same batches, same steps). The
adapter helps its task where its held-out accuracy beats that baseline's.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, List, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from detune_jax.lora.adapter import (Adapter, LoraSettings, apply_adapter,
                                     init_adapter)
from detune_jax.lora.tasks import Examples, Split
from detune_jax.models import bert, checkpoint

# Held-out examples per evaluation batch (one compiled shape).
EVAL_BATCH = 64
# Steps averaged for the start and end training loss.
LOSS_WINDOW = 10


class Head(NamedTuple):
  """A linear classifier: ``logits = pooled @ kernel + bias``."""
  kernel: jax.Array  # [hidden, classes]
  bias: jax.Array    # [classes]


class Metrics(NamedTuple):
  """What one fine-tune did (scalars, or ``[steps]`` for ``losses``).

  Attributes:
    losses: training loss of each step (the batch's mean cross-entropy).
    loss_start: mean of the first ``LOSS_WINDOW`` losses.
    loss_end: mean of the last ``LOSS_WINDOW`` losses.
    held_out_loss: cross-entropy of adapter + head on the held-out examples.
    held_out_accuracy: their accuracy.
    baseline_loss: held-out cross-entropy of the head trained alone on the
      frozen base (NaN when not computed).
    baseline_accuracy: its held-out accuracy (NaN when not computed).
  """
  losses: jax.Array
  loss_start: jax.Array
  loss_end: jax.Array
  held_out_loss: jax.Array
  held_out_accuracy: jax.Array
  baseline_loss: jax.Array
  baseline_accuracy: jax.Array


class TrainResult(NamedTuple):
  """A trained adapter, its task head and its metrics."""
  adapter: Adapter
  head: Head
  metrics: Metrics


class Encoder(NamedTuple):
  """A :class:`~detune_jax.models.bert.Bert` as a pure function.

  Attributes:
    apply: ``apply(tensors, ids [b, t], mask [b, t]) -> [b, t, hidden]``,
      the last hidden state computed with ``tensors``; jit-able.
    tensors: the model's own weights by HF name.
  """
  apply: Callable
  tensors: Dict[str, jax.Array]


def _apply(graphdef, paths, tensors, ids, mask):
  model = checkpoint.Functional(graphdef, paths, {}).module(tensors)
  return model(ids, mask)["last_hidden_state"]


def encoder(model: bert.Bert) -> Encoder:
  """``model`` as a pure function of its HF-named weights.

  >>> cfg = bert.BertConfig(vocab_size=20, hidden_size=8,
  ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
  >>> enc = encoder(bert.Bert(cfg))
  >>> ids = jnp.zeros((1, 3), jnp.int32)
  >>> enc.apply(enc.tensors, ids, jnp.ones_like(ids)).shape
  (1, 3, 8)
  """
  graphdef, paths, tensors = _split(model)
  return Encoder(functools.partial(_apply, graphdef, paths), tensors)


def _split(model: bert.Bert):
  """``(graphdef, paths, tensors)``: the model's structure, where each HF
  name lives in it, and its weights by HF name."""
  return tuple(checkpoint.functional(model, bert.NAME_TABLE))


def _pool(hidden, mask):
  m = mask[..., None].astype(jnp.float32)
  return (hidden.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def _init_head(key, hidden: int, num_classes: int) -> Head:
  # torch.nn.Linear's initialisation, as the PyTorch fine-tunes had.
  bound = 1.0 / np.sqrt(hidden)
  k1, k2 = jax.random.split(key)
  return Head(
      jax.random.uniform(k1, (hidden, num_classes), jnp.float32, -bound,
                         bound),
      jax.random.uniform(k2, (num_classes,), jnp.float32, -bound, bound))


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _evaluate(logits_fn, data: Examples, index):
  """Mean cross-entropy and accuracy of ``logits_fn(ids, mask)`` on
  ``data[index]``, in fixed-size batches (the last padded and weighted 0)."""
  n = index.shape[0]
  pad = (-n) % EVAL_BATCH
  idx = jnp.concatenate([index, jnp.zeros((pad,), index.dtype)])
  weight = jnp.concatenate([jnp.ones((n,)), jnp.zeros((pad,))])

  def one(args):
    i, w = args
    logits = logits_fn(data.ids[i], data.mask[i])
    y = data.labels[i]
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return (_cross_entropy(logits, y) * w).sum(), (correct * w).sum()

  ce, correct = jax.lax.map(
      one, (idx.reshape(-1, EVAL_BATCH), weight.reshape(-1, EVAL_BATCH)))
  return ce.sum() / n, correct.sum() / n


def _fit(apply, settings: LoraSettings, num_classes: int, baseline: bool,
         tensors, data: Examples, train_index, held_out_index, key):
  """One fine-tune, traced: returns ``(adapter, head, Metrics)``."""
  k_adapter, k_head, k_batches = jax.random.split(key, 3)
  adapter = init_adapter(k_adapter, tensors, settings)
  hidden = next(iter(adapter.values())).a.shape[1]
  head = _init_head(k_head, hidden, num_classes)
  picks = jax.random.randint(k_batches, (settings.steps, settings.batch_size),
                             0, train_index.shape[0])
  batches = train_index[picks]
  opt = optax.adamw(settings.learning_rate,
                    weight_decay=settings.weight_decay)

  def logits(adapter, head, ids, mask):
    weights = tensors if adapter is None else apply_adapter(
        tensors, adapter, settings)
    return _pool(apply(weights, ids, mask), mask) @ head.kernel + head.bias

  def run(params, loss_fn):
    def step(carry, idx):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(
          params, data.ids[idx], data.mask[idx], data.labels[idx])
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)),
                                       batches)
    return params, losses

  def lora_loss(params, ids, mask, y):
    return _cross_entropy(logits(*params, ids, mask), y).mean()

  (adapter, head_trained), losses = run((adapter, head), lora_loss)
  held_loss, held_acc = _evaluate(
      functools.partial(logits, adapter, head_trained), data, held_out_index)

  nan = jnp.float32(jnp.nan)
  base_loss, base_acc = nan, nan
  if baseline:
    def head_loss(head, ids, mask, y):
      return _cross_entropy(logits(None, head, ids, mask), y).mean()
    base_head, _ = run(head, head_loss)
    base_loss, base_acc = _evaluate(
        functools.partial(logits, None, base_head), data, held_out_index)

  w = min(LOSS_WINDOW, settings.steps)
  metrics = Metrics(losses, losses[:w].mean(), losses[-w:].mean(), held_loss,
                    held_acc, base_loss, base_acc)
  return adapter, head_trained, metrics


@functools.lru_cache(maxsize=16)
def _program(graphdef, paths, settings: LoraSettings, num_classes: int,
             baseline: bool, stacked: bool):
  """The jitted fine-tune (vmapped over the last three arguments when
  ``stacked``); cached so repeated calls reuse the compiled program."""
  fit = functools.partial(_fit, functools.partial(_apply, graphdef, paths),
                          settings, num_classes, baseline)
  if stacked:
    fit = jax.vmap(fit, in_axes=(None, None, 0, 0, 0))
  return jax.jit(fit)


def _prepare(model, data):
  graphdef, paths, tensors = _split(model)
  data = Examples(*(jnp.asarray(x, jnp.int32) for x in data))
  return graphdef, paths, tensors, data


def train(model: bert.Bert, settings: LoraSettings, data: Examples,
          split: Split, num_classes: int, *,
          baseline: bool = True) -> TrainResult:
  """LoRA-fine-tunes ``model`` on ``data[split.train]``.

  Args:
    model: the base model (left unchanged).
    settings: LoRA and optimiser settings; ``settings.seed`` seeds the
      adapter, the head and the batches.
    data: the task's examples (:func:`~detune_jax.lora.tasks.encode`).
    split: which examples train and which are held out
      (:func:`~detune_jax.lora.tasks.subset`).
    num_classes: classes of the head.
    baseline: also train the head alone on the frozen base, for
      ``Metrics.baseline_*``.

  Returns:
    The :class:`TrainResult`; its adapter is keyed by HF weight name.
  """
  graphdef, paths, tensors, data = _prepare(model, data)
  # The seed only enters through the key: one program serves every seed.
  fit = _program(graphdef, paths, settings._replace(seed=0), int(num_classes),
                 bool(baseline), False)
  adapter, head, metrics = fit(tensors, data, jnp.asarray(split.train),
                               jnp.asarray(split.held_out),
                               jax.random.key(settings.seed))
  return TrainResult(adapter, head, metrics)


def train_many(model: bert.Bert, settings: LoraSettings, data: Examples,
               splits: Sequence[Split], seeds: Sequence[int],
               num_classes: int, *, baseline: bool = True
               ) -> List[TrainResult]:
  """Several fine-tunes of one task at once, ``jax.vmap``-ed over them.

  Fine-tune ``i`` is what :func:`train` gives with ``splits[i]`` and
  ``settings._replace(seed=seeds[i])`` (up to float rounding of the batched
  products).

  Args:
    model: the base model (left unchanged).
    settings: shared settings (``settings.seed`` is not used).
    data: the task's examples.
    splits: one split per fine-tune, all of the same sizes.
    seeds: one seed per fine-tune.
    num_classes: classes of the head.
    baseline: as in :func:`train`.

  Returns:
    One :class:`TrainResult` per fine-tune.

  Raises:
    ValueError: splits of different sizes, or not one seed per split.
  """
  if len(splits) != len(seeds) or not splits:
    raise ValueError(f"{len(splits)} splits and {len(seeds)} seeds")
  if len({(len(s.train), len(s.held_out)) for s in splits}) != 1:
    raise ValueError("splits of different sizes cannot be stacked")
  graphdef, paths, tensors, data = _prepare(model, data)
  fit = _program(graphdef, paths, settings._replace(seed=0), int(num_classes),
                 bool(baseline), True)
  keys = jnp.stack([jax.random.key(s) for s in seeds])
  out = fit(tensors, data, jnp.asarray(np.stack([s.train for s in splits])),
            jnp.asarray(np.stack([s.held_out for s in splits])), keys)
  return [TrainResult(*jax.tree.map(lambda x, i=i: x[i], out))
          for i in range(len(seeds))]
