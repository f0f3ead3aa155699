"""Paired statistics against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from lmdistill.stats import mcnemar, paired_bootstrap


def test_bootstrap_of_two_examples_matches_the_enumerated_distribution():
    # Differences per example: +1 (arm right, baseline wrong) and 0. A resample of 2 examples has mean 0 with
    # probability 1/4, 1/2 with 1/2 and 1 with 1/4: the 95 % percentile interval is [0, 1], the 40 % one [0.5, 0.5].
    baseline, arm = np.array([False, True]), np.array([True, True])
    wide = paired_bootstrap(baseline, arm, resamples=20_000)
    assert (wide.difference, wide.low, wide.high) == (0.5, 0.0, 1.0)
    narrow = paired_bootstrap(baseline, arm, resamples=20_000, level=0.4)
    assert (narrow.low, narrow.high) == (0.5, 0.5)


def test_bootstrap_pools_seeds_with_the_same_example_draws():
    # Seed 0's arm wins on example 0, seed 1's loses on it; pooled, example 0 differs by 0 and the interval is a point.
    baseline = np.array([[False, True, True], [True, True, True]])
    arm = np.array([[True, True, True], [False, True, True]])
    pooled = paired_bootstrap(baseline, arm)
    assert (pooled.difference, pooled.low, pooled.high) == (0.0, 0.0, 0.0)
    assert not pooled.excludes_zero
    # Unpaired in examples (seed 1's order reversed) the same runs no longer cancel.
    assert paired_bootstrap(baseline, arm[:, ::-1]).high > 0


def test_bootstrap_interval_excludes_zero_for_a_clear_win_and_refuses_unpaired_runs():
    rng = np.random.default_rng(0)
    baseline = rng.random(2000) < 0.5
    arm = baseline | (rng.random(2000) < 0.2)  # the arm fixes ~10 % of the examples and breaks none
    interval = paired_bootstrap(baseline, arm)
    assert interval.excludes_zero and interval.low < interval.difference < interval.high
    with pytest.raises(ValueError):
        paired_bootstrap(baseline, arm[:-1])


def test_mcnemar_exact_p_values_by_hand():
    # 1 discordant pair each way: p = 1. 0 against 5: p = 2 / 2^5 = 1/16. 1 against 6: 2 * (1 + 7) / 2^7 = 1/8.
    assert mcnemar(np.array([True, False]), np.array([False, True])).p_value == 1.0
    five = mcnemar(np.zeros(5, bool), np.ones(5, bool))
    assert (five.only_baseline, five.only_arm, five.p_value) == (0, 5, 1 / 16)
    base = np.array([True] + [False] * 6 + [True] * 3)
    arm = np.array([False] + [True] * 6 + [True] * 3)
    assert mcnemar(base, arm).p_value == 1 / 8
    assert mcnemar(np.ones(4, bool), np.ones(4, bool)).p_value == 1.0  # no discordant pair
