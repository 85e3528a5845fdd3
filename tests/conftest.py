"""Shared fixtures: tiny LoRA fine-tuned models on disk."""

import gc
import os
import tempfile

import pytest

from detune_jax.io.synthetic import make_lora_models

# Two fine-tuned shapes (a conv kernel solved as [16, 36]) plus untouched
# tensors; ranks differ per model so that rank="auto" has work to do.
TINY_LAYERS = {"enc.0.q.weight": (32, 24), "enc.1.q.weight": (32, 24),
               "enc.0.conv.weight": (16, 4, 3, 3)}
TINY_FROZEN = {"enc.0.q.bias": (32,), "emb.weight": (10, 24),
               "norm.weight": (24,)}
TINY_RANKS = (2, 2, 3, 4)

# The binaries turn JAX's persistent compilation cache on (in the user's
# cache folder by default): the tests' subprocesses share one of their own.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="detune_jax_test_cache_"))


def make_tiny(root, **kwargs):
  """``make_lora_models`` with the tiny defaults above."""
  kw = dict(n=len(TINY_RANKS), ranks=list(TINY_RANKS), layers=TINY_LAYERS,
            frozen=TINY_FROZEN)
  kw.update(kwargs)
  return make_lora_models(str(root), **kw)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
  """``(model dirs, base dir)`` of 4 float32 tiny fine-tunes."""
  return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
  """Drops each test module's compiled programs when it ends: one process
  runs them all, and every XLA:CPU executable holds memory maps, so without
  this the suite nears the kernel's map limit (vm.max_map_count, 65530)
  and LLVM's allocations fail late in the run."""
  yield
  import jax  # pylint: disable=g-import-not-at-top
  jax.clear_caches()
  gc.collect()
