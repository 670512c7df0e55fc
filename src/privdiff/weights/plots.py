"""The weights attack's figures (PNG bytes): the utility-versus-leak curve of its defences."""

from __future__ import annotations

from privdiff.figures import COLOURS, plt, png_bytes


def weights_defence_curve(defences: dict) -> bytes:
    """Utility (true-prompt identity similarity) against leak (attack identity similarity): one
    line per defence across its knob, the undefended point, and the random-embedding lower bound."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    points = defences["points"]
    undefended = next(p for p in points if p["defence"] == "none")
    names = sorted({p["defence"] for p in points} - {"none"})
    for i, name in enumerate(names):
        line = sorted((p for p in points if p["defence"] == name), key=lambda p: p["knob"])
        xs = [undefended["utility"]["value"]] + [p["utility"]["value"] for p in line]
        ys = [undefended["attack"]["value"]] + [p["attack"]["value"] for p in line]
        ax.plot(xs, ys, "o-", color=COLOURS[i % len(COLOURS)], label=name)
        for p in line:
            ax.annotate(f"{p['knob']:g}", (p["utility"]["value"], p["attack"]["value"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
            if p.get("adaptive_attack"):
                ax.plot(p["utility"]["value"], p["adaptive_attack"]["value"], "x", color=COLOURS[i % len(COLOURS)])
    ax.plot(undefended["utility"]["value"], undefended["attack"]["value"], "k*", markersize=12, label="undefended")
    ax.axhline(defences["lower_bound"]["value"], color="gray", linestyle="--", label="random embedding (lower bound)")
    ax.set_xlabel("utility: true-prompt identity similarity")
    ax.set_ylabel("leak: attack identity similarity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig, bbox_inches="tight")


__all__ = ["weights_defence_curve"]
