"""ROC, AUC, ASR and TPR at low FPR on exact ROCs, with stratified bootstrap intervals
(membership-audit.md §5). Scores: higher means "member"."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from privdiff.metrics.estimate import Estimate
from privdiff.metrics.intervals import clopper_pearson
from privdiff.seeding import numpy_rng

FPR_LEVELS = (0.001, 0.01, 0.05)


def _split(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError("scores and labels must be 1-d arrays of one length")
    if not np.isfinite(scores).all():
        raise ValueError("attack scores contain NaN or inf")
    members, others = scores[labels], scores[~labels]
    if len(members) == 0 or len(others) == 0:
        raise ValueError("need at least one member and one non-member")
    return members, others


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC over every distinct threshold: (fpr, tpr, thresholds), from (0, 0) to (1, 1).

    A threshold s classifies "member" when score >= s; tied scores move together (one vertex).
    """
    members, others = _split(scores, labels)
    thresholds = np.unique(np.concatenate([members, others]))[::-1]
    tpr = (members[None, :] >= thresholds[:, None]).mean(axis=1)
    fpr = (others[None, :] >= thresholds[:, None]).mean(axis=1)
    return (np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr]),
            np.concatenate([[np.inf], thresholds]))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count one half)."""
    members, others = _split(scores, labels)
    ranks = rankdata(np.concatenate([members, others]))
    n1, n0 = len(members), len(others)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def asr(scores: np.ndarray, labels: np.ndarray) -> float:
    """Best balanced accuracy over thresholds: max (TPR + 1 - FPR) / 2."""
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(((tpr + 1 - fpr) / 2).max())


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, alpha: float) -> tuple[float, float]:
    """(interpolated, conservative) TPR at FPR alpha on an exact ROC (membership-audit.md §5)."""
    at_or_below = fpr <= alpha
    f0 = fpr[at_or_below].max()
    t0 = tpr[fpr == f0].max()
    conservative = float(tpr[at_or_below].max())
    above = fpr > alpha
    if not above.any():
        return float(t0), conservative
    f1 = fpr[above].min()
    t1 = tpr[fpr == f1].min()
    return float(t0 + (t1 - t0) * (alpha - f0) / (f1 - f0)), conservative


@dataclass(frozen=True)
class AttackMetrics:
    auc: float
    asr: float
    tpr_at_fpr: dict[str, float]
    tpr_at_fpr_conservative: dict[str, float]
    resolution_limited: dict[str, bool]
    n_members: int
    n_nonmembers: int


def attack_metrics(scores: np.ndarray, labels: np.ndarray, levels: tuple[float, ...] = FPR_LEVELS) -> AttackMetrics:
    members, others = _split(scores, labels)
    fpr, tpr, _ = roc_curve(scores, labels)
    at = {str(a): tpr_at_fpr(fpr, tpr, a) for a in levels}
    return AttackMetrics(auc=auc(scores, labels), asr=float(((tpr + 1 - fpr) / 2).max()),
                         tpr_at_fpr={k: v[0] for k, v in at.items()},
                         tpr_at_fpr_conservative={k: v[1] for k, v in at.items()},
                         resolution_limited={str(a): a < 1 / len(others) for a in levels},
                         n_members=len(members), n_nonmembers=len(others))


def stratified_bootstrap(scores: np.ndarray, labels: np.ndarray, *, resamples: int = 1000, seed: int = 0,
                         levels: tuple[float, ...] = FPR_LEVELS, confidence: float = 0.95) -> dict[str, list[float]]:
    """Percentile intervals of AUC, ASR and TPR@FPR; members and non-members resampled separately."""
    members, others = _split(scores, labels)
    rng = numpy_rng(seed, "audit-bootstrap")
    draws: dict[str, list[float]] = {"auc": [], "asr": [], **{f"tpr@{a}": [] for a in levels}}
    n1, n0 = len(members), len(others)
    y = np.concatenate([np.ones(n1, bool), np.zeros(n0, bool)])
    for _ in range(resamples):
        s = np.concatenate([members[rng.integers(0, n1, n1)], others[rng.integers(0, n0, n0)]])
        m = attack_metrics(s, y, levels)
        draws["auc"].append(m.auc)
        draws["asr"].append(m.asr)
        for a in levels:
            draws[f"tpr@{a}"].append(m.tpr_at_fpr[str(a)])
    q = [(1 - confidence) / 2, (1 + confidence) / 2]
    return {k: [float(x) for x in np.quantile(v, q)] for k, v in draws.items()}


def paired_auc_difference(scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray, *,
                          resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """AUC(a) - AUC(b) for two models scored on the same examples (same order), with a paired
    stratified bootstrap: each resample draws one set of members and non-members for both models."""
    labels = np.asarray(labels).astype(bool)
    members, others = np.flatnonzero(labels), np.flatnonzero(~labels)
    rng = numpy_rng(seed, "audit-paired-bootstrap")
    draws = []
    for _ in range(resamples):
        rows = np.concatenate([rng.choice(members, len(members)), rng.choice(others, len(others))])
        draws.append(auc(scores_a[rows], labels[rows]) - auc(scores_b[rows], labels[rows]))
    q = [(1 - confidence) / 2, (1 + confidence) / 2]
    low, high = (float(x) for x in np.quantile(draws, q))
    return {**Estimate(auc(scores_a, labels) - auc(scores_b, labels), low, high, len(labels)).to_json(),
            "resamples": resamples}


def threshold_at_fpr(scores_nonmembers: np.ndarray, alpha: float) -> float:
    """The lowest threshold whose FPR on these non-members is <= alpha (fixed before evaluation)."""
    ordered = np.sort(np.asarray(scores_nonmembers, dtype=np.float64))[::-1]
    allowed = int(np.floor(alpha * len(ordered)))  # false positives allowed
    return float(np.nextafter(ordered[allowed], np.inf)) if allowed < len(ordered) else float(ordered[-1])


def rates_at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """(TP, n members, FP, n non-members) of the rule score >= threshold."""
    members, others = _split(scores, labels)
    return int((members >= threshold).sum()), len(members), int((others >= threshold).sum()), len(others)


def tpr_interval_at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    tp, n1, fp, n0 = rates_at_threshold(scores, labels, threshold)
    return {"threshold": threshold, "tp": tp, "n_members": n1, "fp": fp, "n_nonmembers": n0,
            "tpr": tp / n1, "tpr_ci": list(clopper_pearson(tp, n1)), "fpr": fp / n0}


def null_auc_sd(n_members: int, n_nonmembers: int) -> float:
    """sd of AUC with no leakage: sqrt((n0 + n1 + 1) / (12 n0 n1))."""
    return float(np.sqrt((n_members + n_nonmembers + 1) / (12 * n_members * n_nonmembers)))
