"""Confidence intervals: seeded bootstrap and exact (Clopper-Pearson) binomial intervals."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import beta

from privdiff.seeding import numpy_rng


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval from beta quantiles."""
    if trials <= 0:
        raise ValueError("Clopper-Pearson needs at least one trial")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes {successes} outside [0, {trials}]")
    alpha = 1.0 - confidence
    lo = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    hi = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return lo, hi


def bootstrap_interval(statistic: Callable[..., float], sizes: Sequence[int], *, point: float,
                       resamples: int = 200, confidence: float = 0.95, seed: int = 0,
                       key: str = "bootstrap") -> tuple[float, float]:
    """Median-centred percentile bootstrap interval of `statistic`.

    Args:
        statistic: called with one count vector per input set (how often each original point
            appears in the resample), so statistics can weight precomputed matrices cheaply.
        sizes: the size of each input set; each set is resampled independently.
        point: the statistic on the original sets.

    The percentile interval is shifted by (median of the resamples - point): plug-in statistics
    such as FID are biased upwards under resampling (duplicates), and the shift removes that
    bias so the interval always contains the point estimate.
    """
    rng = numpy_rng(seed, key)
    values = np.empty(resamples)
    for r in range(resamples):
        counts = [np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64) for n in sizes]
        values[r] = statistic(*counts)
    shift = float(np.median(values)) - point
    lo, hi = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo - shift), float(hi - shift)


def mean_interval(values: np.ndarray, *, resamples: int = 200, seed: int = 0,
                  key: str = "mean") -> tuple[float, float]:
    """Bootstrap interval of a mean."""
    values = np.asarray(values, dtype=np.float64)
    return bootstrap_interval(lambda c: float(c @ values / c.sum()), [len(values)],
                              point=float(values.mean()), resamples=resamples, seed=seed, key=key)
