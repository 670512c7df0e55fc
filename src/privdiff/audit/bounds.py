"""Empirical epsilon lower bounds (membership-audit.md §6)."""

from __future__ import annotations

import math

from scipy.stats import beta, binom


def clopper_pearson_eps(tp: int, n_members: int, fp: int, n_nonmembers: int, *, delta: float = 0.0,
                        alpha: float = 0.05) -> dict:
    """ε_LB from one threshold fixed in advance: the ends of the two-sided CP intervals (union bound)."""
    tpr_lo = 0.0 if tp == 0 else float(beta.ppf(alpha / 2, tp, n_members - tp + 1))
    fpr_hi = 1.0 if fp == n_nonmembers else float(beta.ppf(1 - alpha / 2, fp + 1, n_nonmembers - fp))
    candidates = [0.0]
    if tpr_lo - delta > 0 and fpr_hi > 0:
        candidates.append(math.log((tpr_lo - delta) / fpr_hi))
    if 1 - delta - fpr_hi > 0 and 1 - tpr_lo > 0:
        candidates.append(math.log((1 - delta - fpr_hi) / (1 - tpr_lo)))
    return {"tpr_lo": tpr_lo, "fpr_hi": fpr_hi, "eps": max(candidates), "alpha": alpha, "delta": delta}


def one_run_p_value(eps: float, m: int, r: int, v: int, delta: float) -> float:
    """p-value of ε for v correct out of r guesses on m canaries (Steinke et al., arXiv 2305.08846)."""
    q = math.exp(eps) / (1 + math.exp(eps)) if eps < 700 else 1.0
    p = float(binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if delta > 0 and v > 0:
        cdf = binom.cdf  # P[v - i <= X < v] = F(v - 1) - F(v - i - 1)
        worst = max((cdf(v - 1, r, q) - cdf(v - i - 1, r, q)) / i for i in range(1, v + 1))
        p += 2 * m * delta * float(worst)
    return p


def one_run_eps(m: int, r: int, v: int, *, delta: float = 0.0, p: float = 0.05, steps: int = 40) -> float:
    """The largest ε whose p-value is below p (0 when even ε = 0 is not rejected)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if one_run_p_value(0.0, m, r, v, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(hi, m, r, v, delta) < p:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        if one_run_p_value(mid, m, r, v, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo
