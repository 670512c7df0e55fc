"""Bootstrap and Clopper-Pearson intervals (evaluation.md §11.7-8)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import beta, binomtest

from privdiff.metrics.distances import fid
from privdiff.metrics.intervals import bootstrap_interval, clopper_pearson, mean_interval


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (57, 200), (999, 1000)])
def test_clopper_pearson_matches_scipy_beta_quantiles(k, n):
    lo, hi = clopper_pearson(k, n)
    expected_lo = 0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1)
    expected_hi = 1.0 if k == n else beta.ppf(0.975, k + 1, n - k)
    assert lo == pytest.approx(expected_lo, abs=1e-12) and hi == pytest.approx(expected_hi, abs=1e-12)
    exact = binomtest(k, n).proportion_ci(0.95, method="exact")
    assert (lo, hi) == pytest.approx((exact.low, exact.high), abs=1e-9)


def test_clopper_pearson_refuses_impossible_counts():
    with pytest.raises(ValueError):
        clopper_pearson(5, 3)
    with pytest.raises(ValueError):
        clopper_pearson(0, 0)


def test_mean_interval_is_deterministic_and_contains_the_mean():
    values = np.random.default_rng(0).exponential(size=200)
    first = mean_interval(values, seed=3)
    assert first == mean_interval(values, seed=3)
    assert first != mean_interval(values, seed=4)
    assert first[0] <= values.mean() <= first[1]
    # The interval has the width of a 95 % normal interval for a mean, roughly.
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert (first[1] - first[0]) == pytest.approx(2 * half, rel=0.3)


def test_fid_bootstrap_interval_contains_the_point_even_though_resampling_biases_fid_up():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(150, 8)), rng.normal(size=(150, 8))
    point = fid(x, y)

    def weighted(cx, cy):
        return fid(np.repeat(x, cx.astype(int), 0), np.repeat(y, cy.astype(int), 0))

    lo, hi = bootstrap_interval(weighted, [150, 150], point=point, resamples=100, seed=0)
    assert lo <= point <= hi
    assert (lo, hi) == bootstrap_interval(weighted, [150, 150], point=point, resamples=100, seed=0)
