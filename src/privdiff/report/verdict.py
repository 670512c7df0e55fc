"""A run's membership verdict in words: caught by an attack, at chance, or above chance but not caught.

Thresholds are in units of the null AUC sd (the sd of an attack without information on this test
split), so they scale with the number of test examples. The demo's claims use the same rules.
"""

from __future__ import annotations

from privdiff.metrics.estimate import format_estimate

CAUGHT_NULL_SD = 2  # caught: the best attack (chosen on aux) has its lower interval end above 0.5 + 2 null sd
CHANCE_NULL_SD = 3  # at chance: every attack's test AUC within 3 null sd of 0.5


def largest_auc_gap(audit: dict) -> float:
    """The largest |AUC - 0.5| over the audit's attacks (on test)."""
    return max(abs(a["auc"]["value"] - 0.5) for a in audit["attacks"].values())


def is_caught(audit: dict) -> bool:
    best = audit["attacks"][audit["best_attack"]]["auc"]
    return best["ci"][0] > 0.5 + CAUGHT_NULL_SD * audit["null_auc_sd"]


def is_at_chance(audit: dict) -> bool:
    return largest_auc_gap(audit) <= CHANCE_NULL_SD * audit["null_auc_sd"]


def guarantee_text(privacy: dict) -> str:
    """'(ε, δ)-DP' with the run's numbers, or 'no formal guarantee'."""
    if not privacy or privacy.get("epsilon") is None:
        return "no formal guarantee"
    return f"({privacy['epsilon']:.3g}, {privacy['delta']:.3g})-DP"


def verdict(audit: dict | None) -> dict:
    """{"kind": caught | at chance | above chance | not audited, "text": the verdict in words}."""
    if not audit:
        return {"kind": "not audited", "text": "not audited"}
    name = audit["best_attack"]
    auc = format_estimate(audit["attacks"][name]["auc"])
    if is_caught(audit):
        return {"kind": "caught", "text": f"caught by {name} (AUC {auc})"}
    band = f"{CHANCE_NULL_SD} null sd = {CHANCE_NULL_SD * audit['null_auc_sd']:.3f}"
    if is_at_chance(audit):
        return {"kind": "at chance", "text": f"at chance (every attack within {band} of 0.5; best on aux: {name}, "
                                             f"AUC {auc})"}
    return {"kind": "above chance", "text": f"above chance but not caught (an attack beyond {band} of 0.5; best on "
                                            f"aux: {name}, AUC {auc})"}


__all__ = ["CAUGHT_NULL_SD", "CHANCE_NULL_SD", "guarantee_text", "is_at_chance", "is_caught", "largest_auc_gap",
           "verdict"]
