"""The solvers' traced programs, kept on disk beside JAX's compilation cache.

JAX's persistent compilation cache saves XLA's compile, but every new process
still traces and lowers each program before it can look it up: about a
second for a solver's program, as long as the solve itself on a small model.
:func:`call` keeps the lowered program too (``jax.export``, serialized), in
``<compilation cache>/detune_jax_programs``, keyed by the function, its
static arguments, the shapes and dtypes of its arguments, the versions of
JAX and of this package's sources, and the XLA flags; a later process
loads it and goes straight to the (cached) compile.

It is used only while JAX's persistent compilation cache is on (see
:func:`detune_jax.timings.enable_compilation_cache`; the ``recover`` and
``audit`` binaries turn it on), on one device, with concrete arguments: under
a user's own ``jit``/``vmap``, or sharded over several devices, the function
is called as it is. Anything that goes wrong with a stored program (a
partial file, another format) falls back to the plain call.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import tempfile
import threading
from typing import Any, Callable, Dict, Tuple

import jax

# LLVM's costly optimisation passes off: a first run on MiniLM compiles
# about 0.5 s faster, and the solvers' time is in matrix products and
# LAPACK calls, which these passes do not touch (the output is the same to
# the bit: tests/test_programs.py).
COMPILER_OPTIONS = {"xla_llvm_disable_expensive_passes": True}

_lock = threading.Lock()
_loaded: Dict[str, Callable] = {}
_registered = set()


@functools.lru_cache(maxsize=None)
def _sources_hash() -> str:
  """Hash of the package's sources: a program is stale once they change."""
  root = os.path.dirname(os.path.abspath(__file__))
  h = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(root, "**", "*.py"),
                               recursive=True)):
    with open(path, "rb") as f:
      h.update(path[len(root):].encode() + b"\0" + f.read())
  return h.hexdigest()


def _folder():
  cache = jax.config.jax_compilation_cache_dir
  return os.path.join(cache, "detune_jax_programs") if cache else None


def register_output(cls):
  """Lets :func:`call` store programs that return the NamedTuple ``cls``."""
  if cls not in _registered:
    jax.export.register_namedtuple_serialization(
        cls, serialized_name=f"{cls.__module__}.{cls.__qualname__}")
    _registered.add(cls)
  return cls


def _usable(args) -> bool:
  if jax.device_count() != 1:
    return False
  for a in jax.tree.leaves(args):
    if isinstance(a, jax.core.Tracer):
      return False
  return True


def _key(name: str, statics: Dict[str, Any], args) -> str:
  avals = [(tuple(a.shape), str(a.dtype), bool(getattr(a, "weak_type", False)))
           for a in jax.tree.leaves(args)]
  text = repr((name, sorted((k, repr(v)) for k, v in statics.items()), avals,
               str(jax.tree.structure(args)), jax.__version__,
               jax.default_backend(), os.environ.get("XLA_FLAGS", ""),
               _sources_hash()))
  return hashlib.sha256(text.encode()).hexdigest()[:32]


def _program(fun, name, args, statics, donate):
  """The stored program for ``args`` (loaded or exported once per process),
  or None where :func:`call` runs ``fun`` as it is."""
  folder = _folder()
  if folder is None or not _usable(args):
    return None
  key = _key(name, statics, args)
  with _lock:
    program = _loaded.get(key)
  if program is None:
    program = _load_or_export(fun, name, args, statics, donate, folder, key)
    with _lock:
      _loaded[key] = program
  return program


def call(fun: Callable, name: str, args: Tuple, statics: Dict[str, Any],
         donate: Tuple[int, ...] = ()):
  """``fun(*args, **statics)`` (``fun`` jitted with ``statics`` static),
  through a stored program where one applies (see the module docstring).

  ``args`` may hold ``None`` (it stays ``None``); ``donate``: positions in
  ``args`` whose buffers the call may reuse, as ``fun`` donates them.
  """
  program = _program(fun, name, args, statics, donate)
  if program is None:
    return fun(*args, **statics)
  return program(*args)


def lower(fun: Callable, name: str, specs: Tuple, statics: Dict[str, Any],
          donate: Tuple[int, ...] = ()):
  """``fun`` lowered for arguments shaped like ``specs``, as :func:`call`
  would run it (``.compile()`` it to compile ahead: a later :func:`call`
  with such arguments reuses the executable)."""
  program = _program(fun, name, specs, statics, donate)
  if program is None:
    return fun.lower(*specs, **statics)
  return program.lower(*specs)


def _load_or_export(fun, name, args, statics, donate, folder, key):
  path = os.path.join(folder, f"{name}-{key}.jaxexport")
  exported = None
  try:
    with open(path, "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
  except Exception:  # pylint: disable=broad-except
    exported = None     # none stored yet, or unreadable: export it again
  if exported is None:
    def traced(*a):
      return fun(*a, **statics)
    traced.__name__ = traced.__qualname__ = name   # names its trace events
    wrapped = jax.jit(traced)
    try:
      exported = jax.export.export(wrapped)(*args)
      blob = exported.serialize()
    except Exception:  # pylint: disable=broad-except
      # A program jax.export cannot store: the function as it is.
      return wrapped
    _write_atomic(folder, path, blob)
  return jax.jit(exported.call, donate_argnums=donate,
                 compiler_options=COMPILER_OPTIONS)


def _write_atomic(folder, path, blob):
  """Writes ``blob`` to ``path`` whole or not at all (a concurrent reader
  never sees half a program). A cache that cannot be written is skipped:
  this process still uses the program."""
  tmp = None
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
      f.write(blob)
    os.replace(tmp, path)
  except OSError:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
