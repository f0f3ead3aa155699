"""Statistics of study results: spreads over seeds, and paired comparisons of two arms scored on the same test
examples (bootstrap intervals, McNemar's test)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np


def spread(values: list[float]) -> float | None:
    """Sample standard deviation over seeds; None for a single seed."""
    return statistics.stdev(values) if len(values) > 1 else None


@dataclass(frozen=True)
class Interval:
    """A difference of accuracies (arm − baseline) with a percentile bootstrap interval."""

    difference: float
    low: float
    high: float
    level: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(
    baseline: np.ndarray, arm: np.ndarray, *, resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Percentile interval of the accuracy difference, resampling test examples with the pairs kept.

    Each resample draws n example indices with replacement and applies the same indices to every seed's run, so the
    interval holds the test set's sampling noise with the seeds pooled (the difference is the mean over seeds).

    Args:
        baseline: bool [seeds, n] (or [n]): whether the baseline run of each seed answered each example correctly.
        arm: bool, the same shape and example order, for the arm.
        resamples: number of bootstrap resamples.
        level: coverage of the interval.
        seed: seeds the resampling.

    Returns:
        The observed difference and its interval.
    """
    base, other = np.atleast_2d(baseline).astype(np.float64), np.atleast_2d(arm).astype(np.float64)
    if base.shape != other.shape:
        raise ValueError(f"paired runs differ in shape: {base.shape} and {other.shape}")
    per_example = (other - base).mean(axis=0)  # [n]: the difference of each example, averaged over seeds
    n = per_example.size
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = per_example[draws].mean(axis=1)  # [resamples]
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(per_example.mean()), float(low), float(high), level)


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test on the discordant pairs of two runs over the same examples."""

    only_baseline: int  # examples the baseline got right and the arm wrong
    only_arm: int  # examples the arm got right and the baseline wrong
    p_value: float  # two-sided, exact binomial


def mcnemar(baseline: np.ndarray, arm: np.ndarray) -> McNemar:
    """McNemar's exact test: under no difference each discordant example is a fair coin.

    Args:
        baseline: bool [n], correctness of the baseline run.
        arm: bool [n], correctness of the arm's run on the same examples.
    """
    base, other = np.asarray(baseline, dtype=bool), np.asarray(arm, dtype=bool)
    if base.shape != other.shape or base.ndim != 1:
        raise ValueError(f"McNemar's test needs two runs over the same examples, got {base.shape} and {other.shape}")
    b, c = int((base & ~other).sum()), int((other & ~base).sum())
    n, k = b + c, min(b, c)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    return McNemar(b, c, p)
