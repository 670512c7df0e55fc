"""The audit's ROC figure: log-log axes with a linear inset (membership-audit.md §5)."""

from __future__ import annotations

import numpy as np

from privdiff.audit.roc import FPR_LEVELS, roc_curve
from privdiff.figures import plt, png_bytes


def roc_plot(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], n_members: int, n_nonmembers: int,
             title: str | None = None) -> bytes:
    """curves: attack -> (scores, labels, auc). Returns PNG bytes."""
    fig, ax = plt.subplots(figsize=(5.6, 4.8))
    floor = 1.0 / n_nonmembers
    inset = ax.inset_axes([0.60, 0.08, 0.36, 0.36])
    for name, (scores, labels, auc_value) in curves.items():
        fpr, tpr, _ = roc_curve(scores, labels)
        line, = ax.plot(np.maximum(fpr, floor / 2), np.maximum(tpr, floor / 2), drawstyle="steps-post",
                        label=f"{name} (AUC {auc_value:.3f})")
        inset.plot(fpr, tpr, color=line.get_color(), lw=1)
    grid = np.logspace(np.log10(floor), 0, 50)
    ax.plot(grid, grid, "k--", lw=0.8, label="chance")
    for alpha in FPR_LEVELS:
        if alpha >= floor:
            ax.axvline(alpha, color="gray", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1.05)
    ax.set_xlabel(f"false positive rate ({n_nonmembers} non-members)")
    ax.set_ylabel(f"true positive rate ({n_members} members)")
    ax.set_title(title or "membership inference ROC (test split)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    inset.plot([0, 1], [0, 1], "k--", lw=0.6)
    inset.set_xticks([0, 1])
    inset.set_yticks([0, 1])
    inset.tick_params(labelsize=6)
    return png_bytes(fig, bbox_inches="tight")
