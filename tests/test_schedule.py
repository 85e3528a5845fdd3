"""The rank scheduler, driven by scripted loss sequences, step by step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detune_jax import RankSchedule, rank_schedule_init, rank_schedule_step


def run_schedule(losses, end_rank, total_steps, schedule=RankSchedule()):
  """Ranks after each scheduler step, computed under jit with lax.scan."""

  @jax.jit
  def go(losses):
    def body(state, xs):
      step, loss = xs
      state = rank_schedule_step(schedule, state, loss, step, end_rank,
                                 total_steps)
      return state, state.rank
    steps = jnp.arange(1, losses.shape[0] + 1)
    return jax.lax.scan(body, rank_schedule_init(schedule, end_rank),
                        (steps, losses))[1]

  return np.asarray(go(jnp.asarray(losses, jnp.float32)))


def python_plateau(losses, end_rank, total_steps, start=1, factor=2,
                   patience=15, threshold=0.0, force_pct=0.5):
  """Plain-Python statement of the paper's scheduler (App. E, Table 9)."""
  rank, best, bad, out = start, float("inf"), 0, []
  force_at = total_steps - total_steps * force_pct
  for epoch, loss in enumerate(losses, start=1):
    if epoch < force_at:
      if loss < best * (1 - threshold):
        best, bad = loss, 0
      else:
        bad += 1
      if bad > patience:
        rank, bad = min(rank * factor, end_rank), 0
    else:
      rank = end_rank
    out.append(rank)
  return np.array(out)


def test_constant_loss_doubles_after_patience_plus_one_bad_steps():
  ranks = run_schedule(np.ones(300), end_rank=16, total_steps=300)
  # Step 1 improves on inf; steps 2..17 are 16 bad steps (> patience 15).
  assert (ranks[:16] == 1).all()
  assert ranks[16] == 2          # after the 17th step
  assert (ranks[17:32] == 2).all() and ranks[32] == 4
  assert ranks[48] == 8 and ranks[64] == 16
  assert (ranks[64:] == 16).all()


def test_improving_loss_keeps_rank_until_forced_at_half():
  losses = np.geomspace(1.0, 1e-6, 300)
  ranks = run_schedule(losses, end_rank=32, total_steps=300)
  assert (ranks[:148] == 1).all()
  assert (ranks[149:] == 32).all()  # forced from scheduler step 150 on


def test_rank_is_capped_at_end_rank():
  ranks = run_schedule(np.ones(100), end_rank=3, total_steps=1000)
  assert ranks.max() == 3
  assert list(np.unique(ranks)) == [1, 2, 3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_plain_python_statement_on_random_scripts(seed):
  rng = np.random.default_rng(seed)
  # Mostly flat with occasional improvements and exact repeats.
  losses = np.cumprod(np.where(rng.random(300) < 0.08, 0.5, 1.0))
  losses = np.where(rng.random(300) < 0.3, losses * 1.1, losses)
  expected = python_plateau(losses.astype(np.float32), 16, 300)
  np.testing.assert_array_equal(run_schedule(losses, 16, 300), expected)


def test_threshold_and_factor_are_honoured():
  sched = RankSchedule(factor=4, patience=2, threshold=0.5)
  # Each loss improves by 10% only: below the 50% threshold, so all are bad.
  losses = 0.9 ** np.arange(20)
  ranks = run_schedule(losses, 64, 1000, sched)
  expected = python_plateau(losses.astype(np.float32), 64, 1000, factor=4,
                            patience=2, threshold=0.5)
  np.testing.assert_array_equal(ranks, expected)
  assert ranks[3] == 4 and ranks[6] == 16


def test_fixed_schedule_uses_end_rank_throughout():
  ranks = run_schedule(np.ones(10), 8, 10, RankSchedule(kind="fixed"))
  assert (ranks == 8).all()
  assert int(rank_schedule_init(RankSchedule(kind="fixed"), 8).rank) == 8


def test_unknown_kind_is_refused():
  with pytest.raises(ValueError, match="kind"):
    rank_schedule_init(RankSchedule(kind="cosine"), 8)
