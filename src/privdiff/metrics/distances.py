"""Distances between two feature sets: FID, unbiased KID, and k-NN precision/recall.

All statistics are computed in float64 on (n, d) feature arrays from one extractor
(evaluation.md §3-§5). Numbers from different extractors are never comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privdiff.seeding import numpy_rng


def _as_features(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{name}: expected an (n >= 2, d) feature array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return x


def _psd_sqrt(sym: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((sym + sym.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1^1/2 S2 S1^1/2)^1/2), without complex round-off.

    The trace term is the sum of square roots of the clipped eigenvalues of the symmetric matrix
    S1^1/2 S2 S1^1/2, which equals Tr(sqrtm(S1 S2)) (Heusel et al., arXiv 1706.08500).
    """
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    eigen = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_term = float(np.sqrt(np.clip(eigen, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_term)


def fid(x: np.ndarray, y: np.ndarray) -> float:
    """FID between feature sets x (n1, d) and y (n2, d); covariances use the n - 1 divisor."""
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))


def fid_reliability_warning(n: int, d: int) -> str | None:
    """A note when n < 2d: the covariance estimate (and so FID) is unreliable."""
    if n < 2 * d:
        return f"only {n} samples for {d}-d features (< 2d): FID is unreliable, prefer KID"
    return None


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3, the KID kernel (Binkowski et al., arXiv 1801.01401)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """The unbiased MMD^2 from the three kernel matrices (diagonals of kxx and kyy excluded)."""
    m, n = kxx.shape[0], kyy.shape[0]
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * kxy.mean())


@dataclass(frozen=True)
class KernelMatrices:
    """Kernel matrices of two feature sets, computed once and reused by subsets and the bootstrap."""

    kxx: np.ndarray
    kyy: np.ndarray
    kxy: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray) -> "KernelMatrices":
        x, y = _as_features(x, "x"), _as_features(y, "y")
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
        return cls(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))

    def mmd2(self, ix: np.ndarray, iy: np.ndarray) -> float:
        """Unbiased MMD^2 of the subsets with indices ix, iy (drawn without replacement)."""
        return mmd2_unbiased(self.kxx[np.ix_(ix, ix)], self.kyy[np.ix_(iy, iy)], self.kxy[np.ix_(ix, iy)])

    def mmd2_weighted(self, cx: np.ndarray, cy: np.ndarray) -> float:
        """Unbiased MMD^2 of a resample given as counts per original point (bootstrap).

        Pairs of copies of the same original point are excluded like the diagonal, so the
        statistic stays unbiased under resampling with replacement.
        """
        def within(k: np.ndarray, c: np.ndarray) -> float:
            pairs = c.sum() ** 2 - (c * c).sum()
            return float((c @ k @ c - (c * c * np.diag(k)).sum()) / pairs)

        return within(self.kxx, cx) + within(self.kyy, cy) - 2.0 * float(cx @ self.kxy @ cy) / (
            cx.sum() * cy.sum())


@dataclass(frozen=True)
class KIDResult:
    value: float          # mean over subsets
    subset_sd: float      # spread over subset choice only (0 when both sets enter whole)
    subset_size: int
    num_subsets: int


def kid(x: np.ndarray, y: np.ndarray, *, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0, kernels: KernelMatrices | None = None) -> KIDResult:
    """KID = mean unbiased MMD^2 over `num_subsets` seeded subset pairs of size min(s, m, n)."""
    kernels = kernels or KernelMatrices.of(x, y)
    m, n = kernels.kxx.shape[0], kernels.kyy.shape[0]
    size = min(subset_size, m, n)
    if size < 2:
        raise ValueError("KID needs at least 2 samples per side")
    rng = numpy_rng(seed, "kid-subsets")
    values = np.array([kernels.mmd2(np.sort(rng.choice(m, size, replace=False)),
                                    np.sort(rng.choice(n, size, replace=False)))
                       for _ in range(num_subsets)])
    return KIDResult(float(values.mean()), float(values.std(ddof=1)) if num_subsets > 1 else 0.0,
                     size, num_subsets)


def _kth_neighbour_radii(points: np.ndarray, k: int) -> np.ndarray:
    dist = np.sqrt(np.maximum(_squared_distances(points, points), 0))
    return np.sort(dist, axis=1)[:, k]  # column 0 is the point itself


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T


def manifold_coverage(points: np.ndarray, support: np.ndarray, k: int = 3) -> np.ndarray:
    """For each point, whether it lies in a k-NN ball of some support point (Kynkaanniemi et al.)."""
    points, support = _as_features(points, "points"), _as_features(support, "support")
    if support.shape[0] <= k:
        raise ValueError(f"k-NN manifold needs more than k={k} support points")
    radii = _kth_neighbour_radii(support, k)
    dist = np.sqrt(np.maximum(_squared_distances(points, support), 0))
    return (dist <= radii[None, :]).any(axis=1)


def precision_recall(generated: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample indicators: generated samples inside the real manifold (precision) and
    real samples inside the generated manifold (recall); their means are the two scores."""
    return manifold_coverage(generated, real, k), manifold_coverage(real, generated, k)

