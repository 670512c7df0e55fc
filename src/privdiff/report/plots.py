"""Report figures as PNG bytes (matplotlib, Agg backend, no external resources)."""

from __future__ import annotations

from privdiff.figures import COLOURS, plt, png_bytes


def _png(fig: "plt.Figure") -> bytes:
    return png_bytes(fig, bbox_inches="tight")


def training_curves(runs: list[dict]) -> bytes | None:
    """Training loss (running average) against step, one line per run; beside it, for DP runs,
    the privacy spent so far (RDP upper bound, logged every few steps)."""
    if not any(r["history"] for r in runs):
        return None
    private = any(h.get("epsilon_rdp") is not None for r in runs for h in r["history"])
    fig, axes = plt.subplots(1, 2 if private else 1, figsize=(10.4 if private else 6.4, 3.4), squeeze=False)
    _history_panel(axes[0, 0], runs, "loss_avg", "training loss (running mean)")
    if private:
        _history_panel(axes[0, 1], runs, "epsilon_rdp", "ε spent (RDP upper bound)")
    fig.tight_layout()
    return _png(fig)


def _history_panel(ax, runs: list[dict], key: str, label: str) -> None:
    """One line per run of a logged history value against step (rows without it are skipped)."""
    for i, run in enumerate(runs):
        history = [h for h in run["history"] if h.get(key) is not None]
        if history:
            ax.plot([h["step"] for h in history], [h[key] for h in history],
                    label=run["name"], color=COLOURS[i % len(COLOURS)])
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


PROXY_PANELS = (("loss", "adaptation loss L_ada"), ("ce_m", "proxy's member CE_m"),
                ("proxy_acc", "co-trained proxy accuracy"), ("grad_norm", "LoRA gradient norm"))


def proxy_diagnostics(runs: list[dict]) -> bytes | None:
    """Per-epoch means for runs trained against a proxy (MP/SMP-LoRA): L_ada, CE_m, the co-trained
    proxy's accuracy on the aux (solid) and test (dashed) splits, and the gradient norm."""
    runs = [r for r in runs if any(row.get("ce_m") is not None for row in r["epochs"])]
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(PROXY_PANELS), figsize=(15, 3.3))
    for ax, (key, label) in zip(axes, PROXY_PANELS):
        for i, run in enumerate(runs):
            colour = COLOURS[i % len(COLOURS)]
            for suffix, style in (("_aux", "-"), ("_test", "--")) if key == "proxy_acc" else (("", "-"),):
                rows = [row for row in run["epochs"] if row.get(key + suffix) is not None]
                if rows:
                    ax.plot([row["epoch"] for row in rows], [row[key + suffix] for row in rows], style,
                            color=colour, label=f"{run['name']}{suffix.replace('_', ' ')}", marker="." if suffix else None)
        if key == "proxy_acc":
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def metric_comparison(runs: list[dict], keys: list[str]) -> bytes | None:
    """One panel per metric: each run's value with its 95 % interval."""
    keys = [k for k in keys if any(k in r["metrics"] for r in runs)]
    if not keys:
        return None
    cols = min(4, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 2.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for i, run in enumerate(runs):
            record = run["metrics"].get(key)
            if record is None:
                continue
            lo, hi = record["ci"]
            ax.errorbar([i], [record["value"]], yerr=[[record["value"] - lo], [hi - record["value"]]],
                        fmt="o", color=COLOURS[i % len(COLOURS)], capsize=4)
        ax.set_title(key, fontsize=9)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels([r["name"] for r in runs], fontsize=7, rotation=20)
        ax.set_xlim(-0.6, len(runs) - 0.4)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def heldout_by_timestep(runs: list[dict]) -> bytes | None:
    """Held-out denoising loss per timestep, test members (solid) vs test non-members (dashed)."""
    panels = [(r, r["metrics"].get("heldout_loss/member_test"), r["metrics"].get("heldout_loss/nonmember_test"))
              for r in runs]
    panels = [p for p in panels if p[1] and p[2]]
    if not panels:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for i, (run, members, others) in enumerate(panels):
        colour = COLOURS[i % len(COLOURS)]
        ax.plot(members["timesteps"], members["per_timestep"], "-o", ms=3, color=colour,
                label=f"{run['name']}: test members")
        ax.plot(others["timesteps"], others["per_timestep"], "--s", ms=3, color=colour,
                label=f"{run['name']}: test non-members")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("denoising MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _png(fig)


def privacy_utility(points: list[dict], control: dict | None, utility_label: str) -> bytes:
    """The headline chart: per run, the best attack's AUC (left) and TPR at 1 % FPR (right), each with
    its interval, against a utility measure with its interval. `points`: {"label", "utility", "auc",
    "tpr"} with Estimates in JSON form; `control`: the base model's {"auc", "tpr"} or None. Chance is
    the dotted line, the control the dashed one with its interval shaded."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    panels = (("auc", "best attack's AUC", 0.5), ("tpr", "best attack's TPR at 1 % FPR", 0.01))
    for ax, (key, label, chance) in zip(axes, panels):
        ax.axhline(chance, color="grey", lw=1, ls=":", label=f"chance ({chance:g})")
        if control and control.get(key):
            low, high = control[key]["ci"]
            ax.axhline(control[key]["value"], color="black", lw=1, ls="--",
                       label=f"control, base model ({control[key]['value']:.3g})")
            ax.axhspan(low, high, color="black", alpha=0.06)
        for i, point in enumerate(points):
            x, y = point["utility"], point[key]
            ax.errorbar([x["value"]], [y["value"]],
                        xerr=[[x["value"] - x["ci"][0]], [x["ci"][1] - x["value"]]],
                        yerr=[[y["value"] - y["ci"][0]], [y["ci"][1] - y["value"]]],
                        fmt="o", ms=6, capsize=3, color=COLOURS[i % len(COLOURS)], label=point["label"])
        ax.set_xlabel(utility_label)
        ax.set_ylabel(label)
        ax.set_ylim(0 if key == "tpr" else 0.3, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return _png(fig)
