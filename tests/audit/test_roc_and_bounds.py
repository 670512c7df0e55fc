"""Known answers for the audit metrics and the ε lower bounds (membership-audit.md §5, §6, §9.1-3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import beta

from privdiff.audit.bounds import clopper_pearson_eps, one_run_eps
from privdiff.audit.roc import (asr, attack_metrics, auc, null_auc_sd, roc_curve, stratified_bootstrap,
                                threshold_at_fpr, tpr_at_fpr)

MEMBERS = [0.9, 0.8, 0.7, 0.5, 0.3]
NONMEMBERS = [0.7, 0.4, 0.2, 0.1, 0.05]


def worked():
    return np.array(MEMBERS + NONMEMBERS), np.array([1] * 5 + [0] * 5)


def test_worked_vector_roc_vertices():
    fpr, tpr, _ = roc_curve(*worked())
    vertices = list(zip(fpr.round(6), tpr.round(6)))
    # The spec lists (0,0.2),(0,0.4),(0.2,0.6),(0.2,0.8)...; the tie at 0.7 moves both rates at once.
    for vertex in [(0, 0), (0, 0.2), (0, 0.4), (0.2, 0.6), (0.2, 0.8), (0.4, 0.8), (0.4, 1), (1, 1)]:
        assert vertex in vertices


def test_worked_vector_auc_asr_and_tpr_at_fpr():
    scores, labels = worked()
    assert auc(scores, labels) == pytest.approx(0.86)
    assert asr(scores, labels) == pytest.approx(0.80)
    fpr, tpr, _ = roc_curve(scores, labels)
    assert tpr_at_fpr(fpr, tpr, 0.05) == pytest.approx((0.45, 0.40))
    assert tpr_at_fpr(fpr, tpr, 0.1) == pytest.approx((0.50, 0.40))
    assert tpr_at_fpr(fpr, tpr, 0.2)[0] == pytest.approx(0.80)


def test_ties_count_one_half_and_constant_scores_are_at_chance():
    scores, labels = np.zeros(10), np.array([1] * 5 + [0] * 5)
    assert auc(scores, labels) == 0.5 and asr(scores, labels) == 0.5
    fpr, tpr, _ = roc_curve(scores, labels)
    assert tpr_at_fpr(fpr, tpr, 0.05) == pytest.approx((0.05, 0.0))  # randomising on the diagonal


def test_perfect_separation():
    scores, labels = np.array([5, 6, 7, 1, 2, 3.0]), np.array([1, 1, 1, 0, 0, 0])
    metrics = attack_metrics(scores, labels)
    assert metrics.auc == 1.0 and metrics.asr == 1.0
    assert all(v == 1.0 for v in metrics.tpr_at_fpr.values())
    assert metrics.resolution_limited == {"0.001": True, "0.01": True, "0.05": True}  # 1/3 > 0.05


def test_auc_matches_sklearn_on_random_scores():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=300).round(1), rng.integers(0, 2, 300)  # rounding makes ties
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_bootstrap_is_deterministic_and_stratified(monkeypatch):
    rng = np.random.default_rng(1)
    scores, labels = rng.normal(size=80) + np.r_[np.ones(30), np.zeros(50)], np.r_[np.ones(30), np.zeros(50)]
    first = stratified_bootstrap(scores, labels, resamples=50, seed=3)
    assert first == stratified_bootstrap(scores, labels, resamples=50, seed=3)
    assert first["auc"][0] < auc(scores, labels) < first["auc"][1]
    seen = []
    import privdiff.audit.roc as roc

    real = roc.attack_metrics
    monkeypatch.setattr(roc, "attack_metrics", lambda s, y, levels: seen.append(int(y.sum())) or real(s, y, levels))
    roc.stratified_bootstrap(scores, labels, resamples=20, seed=0)
    assert seen == [30] * 20  # every resample keeps 30 members and 50 non-members


def test_threshold_at_fpr_is_fixed_on_given_nonmembers():
    others = np.arange(100, dtype=float)
    threshold = threshold_at_fpr(others, 0.05)
    assert (others >= threshold).mean() <= 0.05 and (others >= threshold).sum() == 5


def test_null_auc_sd_values_of_the_spec():
    assert null_auc_sd(64, 64) == pytest.approx(0.051, abs=5e-4)
    assert null_auc_sd(128, 128) == pytest.approx(0.036, abs=5e-4)
    assert null_auc_sd(233, 200) == pytest.approx(0.028, abs=5e-4)


@pytest.mark.parametrize("tp,n1,fp,n0,tpr_lo,fpr_hi,eps", [
    (60, 200, 2, 200, 0.2374, 0.0357, 1.90), (100, 200, 20, 200, 0.4287, 0.1502, 1.05),
    (64, 64, 0, 64, 0.9440, 0.0560, 2.82), (128, 128, 0, 128, 0.9716, 0.0284, 3.53),
    (200, 200, 0, 200, 0.9817, 0.0183, 3.98), (1000, 1000, 0, 1000, 0.9963, 0.0037, 5.60)])
def test_clopper_pearson_eps_reproduces_the_spec_table(tp, n1, fp, n0, tpr_lo, fpr_hi, eps):
    bound = clopper_pearson_eps(tp, n1, fp, n0)
    assert bound["tpr_lo"] == pytest.approx(tpr_lo, abs=1e-4)
    assert bound["fpr_hi"] == pytest.approx(fpr_hi, abs=1e-4)
    assert bound["eps"] == pytest.approx(eps, abs=0.005)


def test_clopper_pearson_eps_ceiling_at_200_per_side():
    a = 0.025 ** (1 / 200)
    assert clopper_pearson_eps(200, 200, 0, 200)["eps"] == pytest.approx(math.log(a / (1 - a)), abs=1e-6)
    assert clopper_pearson_eps(100, 200, 100, 200)["eps"] == 0.0


@pytest.mark.parametrize("m,r,v,eps_delta,eps_zero", [
    (1000, 100, 100, 3.47, 3.49), (1000, 100, 90, 1.63, 1.63), (400, 100, 80, 0.96, 0.96),
    (10_000, 1000, 900, 2.02, 2.02), (256, 64, 64, 3.03, 3.04), (1000, 100, 50, 0.00, 0.00)])
def test_one_run_eps_reproduces_the_spec_table(m, r, v, eps_delta, eps_zero):
    assert one_run_eps(m, r, v, delta=1e-5) == pytest.approx(eps_delta, abs=0.005)
    assert one_run_eps(m, r, v, delta=0.0) == pytest.approx(eps_zero, abs=0.005)


def test_one_run_eps_with_zero_delta_is_the_logit_of_the_cp_lower_bound():
    lower = beta.ppf(0.05, 90, 100 - 90 + 1)
    assert one_run_eps(1000, 100, 90) == pytest.approx(math.log(lower / (1 - lower)), abs=1e-6)


def test_paired_auc_difference():
    from privdiff.audit.roc import paired_auc_difference

    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(60), np.zeros(50)]
    noise = rng.normal(size=110)
    same = paired_auc_difference(noise, noise.copy(), labels, resamples=200)
    assert same["value"] == 0 and same["ci"] == [0.0, 0.0]  # paired: identical models never differ
    strong = paired_auc_difference(noise + 2 * labels, noise, labels, resamples=200)
    assert strong["value"] > 0.3 and 0 < strong["ci"][0] < strong["value"] < strong["ci"][1]
