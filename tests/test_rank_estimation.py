"""Rank estimation from pairwise differences of fine-tuned matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import detune_jax as dj
from detune_jax.solvers.rank_estimation import numerical_rank
from detune_jax.synthetic import lora_stack


@pytest.mark.parametrize("rank, n", [(4, 2), (8, 3), (16, 5), (32, 8),
                                     (64, 4), (64, 2), (48, 6)])
def test_true_rank_is_found(rank, n):
  _, W_primes = lora_stack(rank + n, 256, 192, n=n, rank=rank)
  assert dj.estimate_rank(W_primes) == rank


@pytest.mark.parametrize("ranks", [(4, 8, 16, 32, 64), (16, 4, 4), (8, 8, 64, 8)])
def test_per_lora_ranks_are_found(ranks):
  _, W_primes = lora_stack(1, 256, 200, n=len(ranks), rank=ranks)
  assert dj.estimate_rank(W_primes) == ranks


def test_bf16_release_still_gives_the_rank():
  _, W_primes = lora_stack(3, 384, 384, n=5, rank=16, dtype=jnp.bfloat16)
  assert dj.estimate_rank(W_primes) == 16


def test_large_layers_are_sketched():
  # min(d, k) > 2 * max_rank + 16 takes the randomized path.
  _, W_primes = lora_stack(4, 300, 260, n=3, rank=8)
  assert dj.estimate_rank(W_primes, max_rank=32) == 8


def test_odd_sum_with_two_models_is_ambiguous():
  _, W_primes = lora_stack(5, 96, 80, n=2, rank=(3, 4))
  with pytest.raises(dj.RankEstimationError, match="odd"):
    dj.estimate_rank(W_primes)


def test_full_rank_differences_are_refused():
  key = jax.random.key(0)
  W_primes = jax.random.normal(key, (3, 40, 30))
  with pytest.raises(dj.RankEstimationError, match="no rank gap"):
    dj.estimate_rank(W_primes)


def test_identical_models_are_refused():
  _, W_primes = lora_stack(6, 40, 30, n=3, rank=2)
  W_primes = W_primes.at[1].set(W_primes[0])
  with pytest.raises(dj.RankEstimationError, match="identical"):
    dj.estimate_rank(W_primes)


def test_details_report_pairs_and_guess_without_raising():
  _, W_primes = lora_stack(7, 96, 80, n=3, rank=(2, 4, 6))
  est = dj.estimate_rank_details(W_primes)
  assert not est.ambiguous and est.reason == ""
  assert est.ranks == (2, 4, 6)
  assert est.pair_ranks == {(0, 1): 6, (0, 2): 8, (1, 2): 10}
  assert all(g > 3 for g in est.pair_gaps.values())


def test_numerical_rank_of_spectra():
  assert numerical_rank(np.array([5.0, 4.0, 1e-7, 1e-8]))[0] == 2
  assert numerical_rank(np.zeros(4))[0] == 0
  assert numerical_rank(np.array([3.0, 2.9, 2.8, 2.7]))[0] == 4
