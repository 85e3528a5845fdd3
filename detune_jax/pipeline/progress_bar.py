"""The progress bar of a recovery: solved layers on stderr, with JAX's
compiling named while it lasts.

The first group of each shape spends most of its time, often seconds, in
JAX tracing, lowering and compiling its programs; a bar that only counted
layers would sit still through it. :class:`CompileStatus` follows JAX's
monitoring events (each of those stages reports its start and its duration)
and shows ``compiling`` in the bar's postfix while one lasts, with the
bar's clock running; once it ends, that time is taken out of the bar's rate,
so that the rate and ETA count solving only. Log lines go above the bar.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator, Optional

import jax

from detune_jax.timings import COMPILE_EVENTS

# Seconds a compile runs before the bar names it (the many small programs
# JAX builds in milliseconds would only make it flicker), and seconds after
# one ends before the name goes (the stages of one program read as one).
SHOW_AFTER = 0.2
HIDE_AFTER = 0.2
# Seconds between redraws of the bar while it shows a compile.
TICK = 0.25


class CompileStatus:
  """Shows ``compiling`` on a tqdm bar while JAX builds a program.

  :meth:`started` and :meth:`ended` bracket each stage (JAX's monitoring
  events do, through :func:`compile_events`); :meth:`update` shows, keeps
  and clears the status, from a thread every ``tick`` seconds.

  Args:
    bar: a ``tqdm`` bar.
    show_after: seconds a compile runs before it is shown.
    hide_after: seconds after the last stage ends before it is cleared.
    tick: seconds between updates (None: no thread; the caller updates).
  """

  def __init__(self, bar, show_after: float = SHOW_AFTER,
               hide_after: float = HIDE_AFTER,
               tick: Optional[float] = TICK):
    self._bar = bar
    self._show_after = show_after
    self._hide_after = hide_after
    self._lock = threading.Lock()
    self._depth = 0              # stages running now (nested ones count)
    self._busy_since = None      # start of the current span of compiling
    self._idle_since = None      # end of its last stage
    self.shown = False           # the bar says "compiling"
    self._stop = threading.Event()
    self._thread = None
    if tick is not None:
      self._thread = threading.Thread(target=self._run, args=(tick,),
                                      daemon=True)
      self._thread.start()

  def started(self, now: Optional[float] = None):
    """A stage of building a program began (at ``now``, default: the
    time)."""
    with self._lock:
      self._depth += 1
      if self._busy_since is None:
        self._busy_since = time.time() if now is None else now
      self._idle_since = None

  def ended(self, now: Optional[float] = None):
    """A stage of building a program ended (at ``now``)."""
    with self._lock:
      self._depth = max(0, self._depth - 1)
      if not self._depth:
        self._idle_since = time.time() if now is None else now

  def update(self, now: Optional[float] = None):
    """Shows, keeps or clears the status as of ``now``."""
    now = time.time() if now is None else now
    with self._lock:
      if self._depth and not self.shown and (
          now - self._busy_since >= self._show_after):
        self.shown = True
        self._bar.set_postfix_str("compiling")
      elif self._depth and self.shown:
        self._bar.refresh()      # the elapsed time runs on
      elif not self._depth and self._idle_since is not None and (
          now - self._idle_since >= self._hide_after):
        self._end_span()

  def settle(self, now: Optional[float] = None):
    """Ends a span of compiling whose stages have all ended, without waiting
    for more: before the bar counts layers, so that its rate leaves the
    span out."""
    with self._lock:
      if not self._depth and self._busy_since is not None:
        if self._idle_since is None:
          self._idle_since = time.time() if now is None else now
        self._end_span()

  def close(self):
    """Stops the thread and clears the status."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    with self._lock:
      if self._busy_since is not None:
        self._idle_since = self._idle_since or time.time()
        self._end_span()

  def _end_span(self):
    """Clears the status of the span that ended at ``_idle_since`` and
    takes its time (after the bar's last count) out of the bar's rate."""
    if self.shown:
      self.shown = False
      counted_from = max(self._busy_since, self._bar.last_print_t)
      self._bar.last_print_t += max(0.0, self._idle_since - counted_from)
      self._bar.set_postfix_str("")
    self._busy_since = self._idle_since = None

  def _run(self, tick: float):
    while not self._stop.wait(tick):
      self.update()


@contextlib.contextmanager
def compile_events(status) -> Iterator[None]:
  """Calls ``status.started()`` and ``status.ended()`` as each of JAX's
  tracing, lowering and compiling of a program (:data:`COMPILE_EVENTS`)
  starts and ends, in the ``with`` body."""
  def on_start(event: str, value: float, **_):
    del value
    if event in COMPILE_EVENTS:
      status.started()

  def on_end(event: str, duration: float, **_):
    del duration
    if event in COMPILE_EVENTS:
      status.ended()

  # JAX records a stage's start as a scalar event (its start time) and its
  # end as a duration event of the same name.
  jax.monitoring.register_scalar_listener(on_start)
  jax.monitoring.register_event_duration_secs_listener(on_end)
  try:
    yield
  finally:
    jax.monitoring.unregister_scalar_listener(on_start)
    jax.monitoring.unregister_event_duration_listener(on_end)


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
  # mininterval 0: every group's update is drawn (groups take long enough).
  bar = tqdm(total=total, initial=initial, unit="layer", desc=desc,
             dynamic_ncols=True, mininterval=0)
  status = CompileStatus(bar)
  try:
    with _logs_above_the_bar(), compile_events(status):
      yield _LayerBar(bar, status)
  finally:
    status.close()
    bar.close()


class _LayerBar:
  """A tqdm bar whose counts come after the compiling before them."""

  def __init__(self, bar, status: CompileStatus):
    self._bar = bar
    self._status = status

  def update(self, n: int):
    """Counts ``n`` more layers solved."""
    self._status.settle()
    self._bar.update(n)


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
