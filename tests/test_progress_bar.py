"""detune_jax.pipeline.progress_bar: the bar names JAX's compiling."""

import jax
import jax.numpy as jnp

from detune_jax.pipeline import progress_bar


class _Bar:
  """What CompileStatus uses of a tqdm bar."""

  def __init__(self, last_print_t):
    self.last_print_t = last_print_t
    self.postfix = ""
    self.redraws = 0

  def set_postfix_str(self, text):
    self.postfix = text
    self.redraws += 1

  def refresh(self):
    self.redraws += 1


class _Events:
  """Counts the compile phase events a status receives."""

  def __init__(self):
    self.starts = self.ends = 0

  def started(self):
    self.starts += 1

  def ended(self):
    self.ends += 1


def test_jax_compile_events_reach_the_status():
  events = _Events()
  with progress_bar.compile_events(events):
    jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.arange(7.0)).block_until_ready()
  # Tracing, lowering and compiling: each starts and ends.
  assert events.starts == events.ends >= 3
  seen = events.starts
  jax.jit(lambda x: jnp.cos(x) - 2)(jnp.arange(5.0)).block_until_ready()
  assert events.starts == seen   # no listener outside the `with`


def test_compiling_is_shown_while_it_lasts_and_left_out_of_the_rate():
  bar = _Bar(last_print_t=100.0)
  status = progress_bar.CompileStatus(bar, show_after=0.2, hide_after=0.2,
                                      tick=None)
  # A program built in 0.1 s is never named.
  status.started(now=101.0)
  status.update(now=101.05)
  status.ended(now=101.1)
  status.update(now=101.5)
  assert bar.postfix == "" and bar.redraws == 0
  assert bar.last_print_t == 100.0
  # A long one is: its stages (trace, lower, compile) read as one span.
  status.started(now=102.0)
  status.update(now=102.1)
  assert bar.postfix == ""
  status.update(now=102.3)
  assert bar.postfix == "compiling" and status.shown
  status.ended(now=102.5)
  status.started(now=102.55)
  status.update(now=103.0)
  assert bar.postfix == "compiling"
  status.ended(now=105.0)
  status.update(now=105.1)
  assert bar.postfix == "compiling"
  status.update(now=105.3)
  assert bar.postfix == "" and not status.shown
  # The bar's rate counts from the end of compiling: its last count is
  # moved past the 3 s span.
  assert bar.last_print_t == 103.0
  status.close()


def test_counting_layers_ends_a_finished_compile_at_once():
  bar = _Bar(last_print_t=10.0)
  status = progress_bar.CompileStatus(bar, tick=None)
  status.started(now=11.0)
  status.update(now=12.0)
  status.ended(now=14.0)
  status.settle(now=14.05)   # before the grace has passed
  assert bar.postfix == "" and bar.last_print_t == 13.0
  # A compile still running is not ended.
  status.started(now=15.0)
  status.update(now=16.0)
  status.settle(now=16.1)
  assert bar.postfix == "compiling"
  status.close()


def test_close_clears_a_compile_in_progress():
  bar = _Bar(last_print_t=0.0)
  status = progress_bar.CompileStatus(bar, tick=None)
  status.started(now=1.0)
  status.update(now=2.0)
  assert bar.postfix == "compiling"
  status.close()
  assert bar.postfix == ""
