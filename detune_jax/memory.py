"""Giving the process's free heap memory back to the operating system.

XLA compiles with many short-lived allocations; glibc keeps the freed memory
in its arenas, so after a compile the process holds a few hundred MiB it no
longer uses (on the Mistral-shaped solve, 4096 x 4096 x 12, about 430 MiB
right after compiling against about 160 MiB after :func:`trim_heap`, read
from RSS by a one-off script; ``experiments.bench_solver`` prints what the
compiled solver keeps after the trim). A stack loaded after that reuses
nothing of it: the peak is the stack plus the retained compiler memory.
:func:`detune_jax.precompile` compiles before the stack exists and trims.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
  name = ctypes.util.find_library("c")
  if not name:
    return None
  try:
    return ctypes.CDLL(name).malloc_trim
  except (OSError, AttributeError):   # not glibc (musl, macOS, Windows)
    return None


def trim_heap() -> bool:
  """Returns free heap memory to the OS (glibc ``malloc_trim``).

  Returns:
    Whether the C library offers it (``False`` elsewhere: a no-op).
  """
  fn = _malloc_trim()
  if fn is None:
    return False
  fn(0)
  return True


def resident_bytes(field: str = "VmRSS") -> int:
  """This process's resident memory (``VmRSS``) or its peak (``VmHWM``).

  From ``/proc/self/status``; ``-1`` where there is none (not Linux).
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return -1
