"""Checks that a compiled XLA:CPU program never runs two LAPACK calls at once.

jaxlib 0.10's batched LAPACK kernels split their batch over XLA:CPU's
intra-op thread pool and block the calling pool thread until the pieces are
done. XLA runs independent instructions concurrently, so two such calls at
once can block every thread of a small pool (2 on a 2-core machine) with
their pieces still queued: the program deadlocks, every thread idle. A
program is safe when every pair of its batched LAPACK calls (or of
instructions that run them inside: while loops, calls, conditionals) is
ordered by data dependencies. A call on a single matrix runs on the calling
thread and waits for nothing.
"""

from __future__ import annotations

import re
from typing import Dict, List, Set, Tuple

_HEADER = re.compile(r"^(?:ENTRY\s+)?(%[\w.\-]+)\s*\(.*\{\s*$")
_DEF = re.compile(r"^(?:ROOT\s+)?(%[\w.\-]+)\s*=")
_NAME = re.compile(r"%[\w.\-]+")
_RESULT = re.compile(r"=\s*\(?\w+\[([\d,]*)\]")
_CALLED = re.compile(
    r"(?:calls|body|condition|to_apply)=(%[\w.\-]+)|"
    r"branch_computations=\{([^}]*)\}")


def _computations(text: str) -> Dict[str, List[str]]:
  comps, current = {}, None
  for line in text.splitlines():
    line = line.strip()
    m = _HEADER.match(line)
    if m and "=" not in line.split("(")[0]:
      current = m.group(1)
      comps[current] = []
    elif line == "}":
      current = None
    elif current is not None and _DEF.match(line):
      comps[current].append(line)
  return comps


def _called(line: str) -> List[str]:
  out = []
  for single, branches in _CALLED.findall(line):
    out += [single] if single else _NAME.findall(branches)
  return out


def _batched_lapack(line: str) -> bool:
  """A LAPACK call on more than one matrix: only those use the pool (a
  single matrix runs on the calling thread)."""
  if 'custom_call_target="lapack_' not in line:
    return False
  dims = [int(x) for x in _RESULT.search(line).group(1).split(",") if x]
  batch = 1
  for x in dims[:-2]:
    batch *= x
  return batch > 1


def concurrent_lapack_calls(hlo_text: str) -> List[Tuple[str, str, str]]:
  """``(computation, a, b)`` for every pair of instructions of a
  computation that run batched LAPACK calls and that no data dependency
  orders (empty: safe)."""
  comps = _computations(hlo_text)
  has_lapack: Dict[str, bool] = {}

  def lapack_in(comp: str) -> bool:
    if comp not in has_lapack:
      has_lapack[comp] = False
      has_lapack[comp] = any(_runs_lapack(l) for l in comps.get(comp, []))
    return has_lapack[comp]

  def _runs_lapack(line: str) -> bool:
    return (_batched_lapack(line)
            or any(lapack_in(c) for c in _called(line)))

  bad = []
  for comp, lines in comps.items():
    names = [_DEF.match(l).group(1) for l in lines]
    known = set(names)
    deps: Dict[str, Set[str]] = {}
    for name, line in zip(names, lines):
      called = set(_called(line))
      deps[name] = {t for t in _NAME.findall(line.split("=", 1)[1])
                    if t in known and t not in called and t != name}
    ancestors: Dict[str, Set[str]] = {}
    for name in names:                     # definitions precede uses
      acc = set()
      for d in deps[name]:
        acc |= {d} | ancestors.get(d, set())
      ancestors[name] = acc
    runs = [n for n, l in zip(names, lines) if _runs_lapack(l)]
    for i, a in enumerate(runs):
      for b in runs[i + 1:]:
        if a not in ancestors[b] and b not in ancestors[a]:
          bad.append((comp, a, b))
  return bad
