"""The progress bar of a recovery: solved layers on stderr, log lines
above it."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional


@contextlib.contextmanager
def layer_bar(total: int, initial: int, desc: str,
              enabled: bool = True) -> Iterator[Optional[object]]:
  """A tqdm bar of solved layers (with ETA) on stderr, or None.

  Args:
    total: layers this process solves.
    initial: those already solved (a resumed run).
    desc: the bar's label.
    enabled: False: no bar (the ``with`` gives None).

  Yields:
    The bar: ``update(n)`` it as ``n`` more layers are solved.
  """
  if not enabled:
    yield None
    return
  from tqdm import tqdm
  bar = tqdm(total=total, initial=initial, unit="layer", desc=desc,
             dynamic_ncols=True)
  try:
    with _logs_above_the_bar():
      yield bar
  finally:
    bar.close()


@contextlib.contextmanager
def _logs_above_the_bar():
  """Log lines written while the progress bar shows go above it (through
  ``tqdm.write``), not into the bar's line."""
  from absl import logging as absl_logging
  from tqdm import tqdm
  handler = absl_logging.get_absl_handler().python_handler
  stream = handler.stream

  class _AboveTheBar:

    def write(self, text):
      if text.strip():
        tqdm.write(text.rstrip("\n"), file=stream)

    def flush(self):
      stream.flush()

  handler.stream = _AboveTheBar()
  try:
    yield
  finally:
    handler.stream = stream
