"""Where a run's time goes, and JAX's persistent compilation cache.

:class:`Timings` adds up wall seconds by phase (``with t.phase("read"):``)
and, from JAX's monitoring events, the seconds JAX spent tracing, lowering
and compiling (or reading compiled programs from the persistent cache)
while the run was going: :meth:`Timings.summary` reports that as
``compile`` and takes it out of the phase it happened in, so ``solve`` is
the time the programs ran.

:func:`enable_compilation_cache` points JAX's persistent compilation cache at
a folder in the user's cache directory, so that a second run of the same
shapes loads its programs instead of compiling them (seconds per program on
CPU).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Dict, Optional

import jax

# The monitoring events JAX records for each program it builds: tracing to
# a jaxpr, lowering to MLIR, and XLA's compile (or its read from the cache).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")

_lock = threading.Lock()
_compile_seconds = 0.0
_listening = False


def _on_duration(event: str, duration: float, **_):
  global _compile_seconds
  if event in COMPILE_EVENTS:
    with _lock:
      _compile_seconds += duration


def compile_seconds() -> float:
  """Seconds JAX has spent building programs in this process since the
  first :class:`Timings` was made."""
  with _lock:
    return _compile_seconds


def _listen():
  global _listening
  with _lock:
    if _listening:
      return
    _listening = True
  jax.monitoring.register_event_duration_secs_listener(_on_duration)


class Timings:
  """Wall seconds by phase, with JAX's compile time split out."""

  def __init__(self):
    _listen()
    self.seconds: Dict[str, float] = {}
    self.compile: Dict[str, float] = {}

  @contextlib.contextmanager
  def phase(self, name: str):
    """Adds the wall time of the ``with`` body to phase ``name``."""
    c0, t0 = compile_seconds(), time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] = (self.seconds.get(name, 0.0)
                            + time.perf_counter() - t0)
      self.compile[name] = (self.compile.get(name, 0.0)
                            + compile_seconds() - c0)

  def summary(self) -> Dict[str, float]:
    """Seconds by phase, rounded to ms; JAX's program building inside any
    phase is moved to ``compile``."""
    out = {name: max(0.0, s - self.compile.get(name, 0.0))
           for name, s in self.seconds.items()}
    out["compile"] = sum(self.compile.values())
    return {k: round(v, 3) for k, v in out.items()}


def default_cache_dir() -> str:
  """``$XDG_CACHE_HOME/detune_jax/jax_cache`` (``~/.cache`` by default)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(base, "detune_jax", "jax_cache")


def enable_compilation_cache(path: Optional[str] = None) -> Optional[str]:
  """Turns on JAX's persistent compilation cache; returns its folder.

  ``path``: the folder (``""`` turns the cache off and returns None). By
  default a folder already configured in JAX is kept (JAX reads
  ``$JAX_COMPILATION_CACHE_DIR`` itself), else :func:`default_cache_dir`.
  Programs that compile in under 0.1 s are cached too (JAX's default skips
  those under 1 s, most of a recovery's small programs). A folder that
  cannot be created leaves the cache off: it only saves time.
  """
  if path is None:
    path = jax.config.jax_compilation_cache_dir or default_cache_dir()
  if not path:
    jax.config.update("jax_compilation_cache_dir", None)
    return None
  path = os.path.expanduser(path)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    jax.config.update("jax_compilation_cache_dir", None)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
