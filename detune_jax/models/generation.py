"""Text generation with the causal LM port: one jitted loop, a key/value
cache, greedy or sampled decoding, the model's own tokenizer and chat
template.

The loop (:func:`generate_ids`) is a ``jax.lax.while_loop`` over new tokens
inside one compiled program: prompts are left-padded into a fixed
``[batch, bucket]`` shape, the prompt fills the cache in one pass, then each
step feeds one token per row. Nothing is recompiled per token, and the
programs are cached per (model structure, shape, settings), so a second
model of the same architecture (:meth:`TextGenerator.use`) reuses them.

Sampling follows HF's ``generate``: temperature, then top-k, then top-p on
float32 logits. Row ``r`` of a call draws from ``fold_in(key(seed),
r_global)`` only, so a prompt's continuation depends on the seed and its
index, not on the batch it lands in or the model's neighbours — the
reference and every candidate decode from the same randomness.

>>> from detune_jax.models import llama
>>> cfg = llama.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
...     num_hidden_layers=1, num_attention_heads=2, eos_token_id=(1,))
>>> tokens = generate_ids(llama.Llama(cfg), [[3, 4], [5]], max_new_tokens=4)
>>> len(tokens), all(len(t) <= 4 for t in tokens)
(2, True)
"""

from __future__ import annotations

import functools
import json
import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from detune_jax.io.errors import BadInputError
from detune_jax.models import batching, llama


class Sampling(NamedTuple):
  """How the next token is chosen (hashable: part of the compiled program).

  ``greedy``: the most likely token; otherwise a draw from the softmax of
  ``logits / temperature`` restricted to the ``top_k`` most likely tokens
  (0: all) and then to the smallest set whose probability reaches ``top_p``
  (1.0: all).
  """
  greedy: bool = False
  temperature: float = 0.7
  top_k: int = 50
  top_p: float = 0.95


GREEDY = Sampling(greedy=True)
# The paper's decoding of Mistral-7B (App. D).
PAPER = Sampling(temperature=0.7, top_k=50, top_p=0.95)


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """``logits [..., vocab]`` (float32) scaled by the temperature, the
  tokens outside top-k and top-p set to the lowest float, as HF's logits
  warpers do (ties at a cut are kept)."""
  low = jnp.finfo(jnp.float32).min
  logits = logits.astype(jnp.float32) / sampling.temperature
  if 0 < sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, low, logits)
  if sampling.top_p < 1.0:
    ascending = jnp.sort(logits, -1)
    cum = jnp.cumsum(jax.nn.softmax(ascending, -1), -1)
    # HF drops the tokens whose cumulative probability (ascending) is at
    # most 1 - top_p, always keeping the most likely one.
    keep = (cum > 1.0 - sampling.top_p).at[..., -1].set(True)
    cutoff = jnp.take_along_axis(ascending, jnp.argmax(keep, -1)[..., None],
                                 -1)
    logits = jnp.where(logits < cutoff, low, logits)
  return logits


def choose(logits: jax.Array, keys: jax.Array,
           sampling: Sampling) -> jax.Array:
  """Next tokens ``[b]`` from ``logits [b, vocab]``, row ``r`` drawing
  with ``keys[r]``."""
  if sampling.greedy:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  filtered = filter_logits(logits, sampling)
  return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


def _loop(graphdef, max_new_tokens: int, sampling: Sampling,
          eos: Tuple[int, ...], pad_id: int, use_cache: bool,
          state, ids, mask, keys):
  """The traced generation: ``(tokens [b, N], lengths [b])``; row ``r``'s
  continuation is ``tokens[r, :lengths[r]]`` (its EOS included)."""
  model = nnx.merge(graphdef, state)
  b, t = ids.shape
  n = max_new_tokens
  slots = t + n
  eos_ids = jnp.asarray(eos or (-1,), jnp.int32)
  full_mask = jnp.concatenate([mask, jnp.zeros((b, n), mask.dtype)], 1)
  next_pos = mask.sum(-1).astype(jnp.int32)
  if use_cache:
    cache = llama.Cache.empty(model.config, b, slots,
                              model.embed_tokens.weight.dtype)
    cache = cache._replace(key_mask=full_mask)
    h, cache = model.hidden(ids, llama.positions_of(mask), cache=cache)
    memory = cache
  else:
    buf = jnp.concatenate([ids, jnp.full((b, n), pad_id, ids.dtype)], 1)
    h, _ = model.hidden(ids, llama.positions_of(mask), mask)
    memory = (buf, full_mask)
  logits = model.logits(h[:, -1])

  def step(carry):
    i, logits, memory, out, done, pos = carry
    tok = choose(logits, jax.vmap(jax.random.fold_in, (0, None))(keys, i),
                 sampling)
    tok = jnp.where(done, pad_id, tok)
    out = out.at[:, i].set(tok)
    finished = done | jnp.isin(tok, eos_ids)
    written = jnp.where(done, 0, 1).astype(jnp.int32)
    if use_cache:
      cache = memory._replace(
          key_mask=memory.key_mask.at[:, t + i].set(written))
      h, memory = model.hidden(tok[:, None], pos[:, None], cache=cache,
                               index=t + i)
      h = h[:, 0]
    else:
      buf, bmask = memory
      buf = buf.at[:, t + i].set(tok)
      bmask = bmask.at[:, t + i].set(written)
      h, _ = model.hidden(buf, llama.positions_of(bmask), bmask)
      h = jax.lax.dynamic_index_in_dim(h, t + i, axis=1, keepdims=False)
      memory = (buf, bmask)
    return (i + 1, model.logits(h), memory, out, finished,
            pos + written)

  def more(carry):
    i, _, _, _, done, _ = carry
    return (i < n) & ~jnp.all(done)

  out = jnp.full((b, n), pad_id, jnp.int32)
  done = jnp.zeros((b,), bool)
  carry = (jnp.int32(0), logits, memory, out, done, next_pos)
  _, _, _, out, _, _ = jax.lax.while_loop(more, step, carry)
  is_eos = jnp.isin(out, eos_ids)
  first_eos = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, -1) + 1, n)
  return out, first_eos


@functools.lru_cache(maxsize=32)
def _program(graphdef, max_new_tokens, sampling, eos, pad_id, use_cache):
  return jax.jit(functools.partial(_loop, graphdef, max_new_tokens, sampling,
                                   eos, pad_id, use_cache))


def left_pad(seqs: Sequence[Sequence[int]], length: int, rows: int,
             pad_id: int) -> Tuple[np.ndarray, np.ndarray]:
  """``ids, mask [rows, length]``: each sequence right-aligned; rows past
  ``len(seqs)`` hold one unmasked pad token (no empty attention row)."""
  ids = np.full((rows, length), pad_id, np.int32)
  mask = np.zeros((rows, length), np.int32)
  for r, s in enumerate(seqs):
    if s:
      ids[r, length - len(s):] = s
      mask[r, length - len(s):] = 1
  mask[len(seqs):, -1] = 1
  return ids, mask


def generate_ids(model: llama.Llama, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int = 50, sampling: Sampling = GREEDY,
                 seed: int = 0, batch_size: int = 8, use_cache: bool = True,
                 eos: Optional[Sequence[int]] = None,
                 pad_id: Optional[int] = None,
                 buckets: Optional[Sequence[int]] = None,
                 first_index: int = 0) -> List[List[int]]:
  """Continuations of token-id prompts, in prompt order.

  Args:
    model: the causal LM.
    prompts: token ids per prompt (each non-empty).
    max_new_tokens: the most tokens generated per prompt.
    sampling: greedy (default) or a :class:`Sampling`.
    seed: with ``first_index``, the randomness: prompt ``i`` samples with
      ``fold_in(key(seed), first_index + i)`` whatever its batch.
    batch_size: rows per compiled call; the last batch is padded.
    use_cache: decode with the key/value cache (the default), or recompute
      the whole sequence each step (a check of the cache, slower).
    eos: token ids that end a continuation (default: the config's).
    pad_id: the id padding uses (default: the config's pad, else EOS, else
      0); never attended.
    buckets: prompt lengths batches are padded to (default: a few steps up
      to the longest prompt), bounding the compiles.
    first_index: the global index of ``prompts[0]`` (see ``seed``).

  Returns:
    Each prompt's new tokens, up to and including the first EOS.
  """
  cfg = model.config
  eos = tuple(cfg.eos_token_id if eos is None else eos)
  if pad_id is None:
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (
        eos[0] if eos else 0)
  if any(len(p) == 0 for p in prompts):
    raise ValueError("an empty prompt (tokenise with the BOS token, or give "
                     "it some text)")
  longest = max(len(p) for p in prompts)
  sizes = sorted(buckets) if buckets else batching.buckets(longest)
  graphdef, state = nnx.split(model)
  program = _program(graphdef, int(max_new_tokens), sampling, eos,
                     int(pad_id), bool(use_cache))
  root = jax.random.key(seed)
  out: List[List[int]] = [[] for _ in prompts]
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  for start in range(0, len(order), batch_size):
    index = order[start:start + batch_size]
    length = next((s for s in sizes if s >= max(len(prompts[i])
                                                for i in index)), None)
    if length is None:
      raise ValueError(f"a prompt of {longest} tokens over the last bucket "
                       f"{sizes[-1]}")
    ids, mask = left_pad([prompts[i] for i in index], length, batch_size,
                         pad_id)
    rows = list(index) + [0] * (batch_size - len(index))
    keys = jax.vmap(jax.random.fold_in, (None, 0))(
        root, jnp.asarray(rows) + first_index)
    tokens, lengths = jax.device_get(program(state, ids, mask, keys))
    for r, i in enumerate(index):
      out[i] = tokens[r, :lengths[r]].tolist()
  return out


class TextGenerator:
  """A causal LM with its tokenizer and chat template: text in, text out.

  Reads ``tokenizer.json`` (the ``tokenizers`` library) and the chat
  template (``tokenizer_config.json``'s ``chat_template``, or
  ``chat_template.jinja``) from ``model_dir``.

  Args:
    model: the port, e.g. :func:`detune_jax.models.llama.load`.
    model_dir: the directory with the tokenizer files.
    batch_size: prompts per compiled call.
  """

  def __init__(self, model: llama.Llama, model_dir: str, *,
               batch_size: int = 8):
    import tokenizers  # pylint: disable=g-import-not-at-top
    file = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(file):
      raise BadInputError(model_dir, "no tokenizer.json")
    self.tokenizer = tokenizers.Tokenizer.from_file(file)
    self.tokenizer.no_padding()
    self.tokenizer.no_truncation()
    self.model = model
    self.model_dir = model_dir
    self.batch_size = batch_size
    self._graphdef = nnx.graphdef(model)
    self._template_source = _chat_template(model_dir)
    self._special = _special_tokens(model_dir)

  def use(self, model: llama.Llama):
    """Generates with ``model``'s weights from now on (same architecture:
    the compiled programs are reused)."""
    if nnx.graphdef(model) != self._graphdef:
      raise ValueError("a model of another architecture than the "
                       "generator's")
    self.model = model

  def render_chat(self, prompt: str) -> str:
    """``prompt`` as one user turn of the model's chat template, ready for
    the assistant's answer."""
    if self._template_source is None:
      raise BadInputError(self.model_dir, "no chat template "
                          "(tokenizer_config.json chat_template)")
    import jinja2  # pylint: disable=g-import-not-at-top
    from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

    def raise_exception(message):
      raise jinja2.TemplateError(message)

    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True,
                                                lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(self._template_source)
    return template.render(messages=[{"role": "user", "content": prompt}],
                           add_generation_prompt=True, **self._special)

  def encode(self, prompts: Sequence[str], chat: bool = False
             ) -> List[List[int]]:
    """Token ids of each prompt: through the chat template when ``chat``
    (whose text carries its own special tokens), else with the tokenizer's
    own special tokens (e.g. a BOS)."""
    if chat:
      texts = [self.render_chat(p) for p in prompts]
      return [e.ids for e in self.tokenizer.encode_batch(
          texts, add_special_tokens=False)]
    return [e.ids for e in self.tokenizer.encode_batch(list(prompts))]

  def decode(self, ids: Sequence[Sequence[int]]) -> List[str]:
    """Texts of token ids, special tokens skipped."""
    return self.tokenizer.decode_batch([list(i) for i in ids],
                                       skip_special_tokens=True)

  def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 50,
               sampling: Sampling = GREEDY, seed: int = 0,
               chat: bool = False, use_cache: bool = True) -> List[str]:
    """The continuation of each prompt (without the prompt), decoded with
    special tokens skipped."""
    ids = generate_ids(self.model, self.encode(prompts, chat),
                       max_new_tokens=max_new_tokens, sampling=sampling,
                       seed=seed, batch_size=self.batch_size,
                       use_cache=use_cache)
    return self.decode(ids)


def _chat_template(model_dir: str) -> Optional[str]:
  jinja = os.path.join(model_dir, "chat_template.jinja")
  if os.path.exists(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  cfg = _tokenizer_config(model_dir)
  template = cfg.get("chat_template")
  if isinstance(template, list):  # named templates: the default one
    template = next((t["template"] for t in template
                     if t.get("name") == "default"), None)
  return template


def _tokenizer_config(model_dir: str) -> dict:
  path = os.path.join(model_dir, "tokenizer_config.json")
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise BadInputError(path, f"unreadable tokenizer config: {e}") from None


def _special_tokens(model_dir: str) -> dict:
  """The special-token strings chat templates refer to (``bos_token``,
  ...), as plain strings."""
  cfg = _tokenizer_config(model_dir)
  out = {}
  for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
    value = cfg.get(key)
    if isinstance(value, dict):
      value = value.get("content")
    out[key] = value or ""
  return out
