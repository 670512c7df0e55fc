"""FID, KID and precision/recall against independent computations (evaluation.md §11.1-2)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import sqrtm

from privdiff.metrics.distances import KernelMatrices, fid, kid, precision_recall


def scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook formula with scipy's sqrtm (independent of privdiff's eigen route)."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root.real))


def loop_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 with the cubic kernel, as explicit double sums."""
    d = x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def features(seed: int, n: int = 500, d: int = 64, shift: float = 0.0) -> np.ndarray:
    mixing = np.random.default_rng(12345).normal(size=(d, d)) / np.sqrt(d)  # one distribution for all seeds
    return np.random.default_rng(seed).normal(size=(n, d)) @ mixing + shift


def test_fid_of_a_set_with_itself_is_zero():
    x = features(0)
    assert abs(fid(x, x)) < 1e-8 * np.trace(np.cov(x, rowvar=False))


@pytest.mark.parametrize("seed", range(5))
def test_fid_matches_scipy_sqrtm(seed):
    x, y = features(seed), features(seed + 100, shift=0.3)
    ours, reference = fid(x, y), scipy_fid(x, y)
    assert abs(ours - reference) <= 1e-6 * abs(reference)


def test_fid_of_a_constant_shift_is_its_squared_norm():
    x = features(1)
    v = np.random.default_rng(2).normal(size=x.shape[1])
    assert fid(x + v, x) == pytest.approx(float(v @ v), rel=1e-9)


def test_kid_matches_direct_double_sum():
    x, y = features(3, n=60, d=16), features(4, n=50, d=16, shift=0.2)
    result = kid(x, y, num_subsets=5, subset_size=1000)
    assert result.subset_size == 50
    full = KernelMatrices.of(x, y).mmd2(np.arange(60), np.arange(50))
    assert full == pytest.approx(loop_mmd2(x, y), rel=1e-6)
    # n = s: y enters whole, so each subset value is checked against the double sum on that subset.
    rng_x = np.random.default_rng(0)
    ix = np.sort(rng_x.choice(60, 50, replace=False))
    assert KernelMatrices.of(x, y).mmd2(ix, np.arange(50)) == pytest.approx(loop_mmd2(x[ix], y), rel=1e-6)


def test_kid_subset_sd_is_zero_when_both_sets_enter_whole():
    x, y = features(5, n=40, d=8), features(6, n=40, d=8)
    result = kid(x, y, num_subsets=10, subset_size=1000)
    assert result.subset_sd == pytest.approx(0.0, abs=1e-12)
    assert result.value == pytest.approx(loop_mmd2(x, y), rel=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_kid_of_two_samples_of_one_distribution_is_near_zero(seed):
    # m = n = 2s (evaluation.md §11.2): with m = n = s the sd is 0 and the check would always fail.
    x, y = features(seed, n=400), features(seed + 50, n=400)
    result = kid(x, y, num_subsets=100, subset_size=200, seed=seed)
    assert abs(result.value) < 3 * result.subset_sd


def test_kid_detects_a_shift():
    x, y = features(7, n=300), features(8, n=300, shift=0.5)
    result = kid(x, y, num_subsets=20, subset_size=150)
    assert result.value > 10 * result.subset_sd


def test_weighted_mmd_with_unit_counts_equals_plain_mmd():
    x, y = features(9, n=30, d=8), features(10, n=20, d=8)
    kernels = KernelMatrices.of(x, y)
    assert kernels.mmd2_weighted(np.ones(30), np.ones(20)) == pytest.approx(
        kernels.mmd2(np.arange(30), np.arange(20)), rel=1e-12)


def test_precision_recall_of_identical_sets_is_one_and_of_far_sets_zero():
    x = features(11, n=100, d=8)
    precision, recall = precision_recall(x, x)
    assert precision.all() and recall.all()
    precision, recall = precision_recall(x + 100.0, x)
    assert not precision.any() and not recall.any()


def test_bad_features_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        fid(np.full((5, 3), np.nan), np.ones((5, 3)))
    with pytest.raises(ValueError, match="feature sizes differ"):
        fid(np.ones((5, 3)), np.ones((5, 4)))
