"""Attack × defence grid (split-controlnet.md §9.5, issue 8): which protocol configurations resist which attacks,
measured, with the utility of each configuration measured beside it.

Each defence is a set of protocol overrides. For each: every applicable attack is run and scored
against held-out victims, and (unless skipped) a split run with the same protocol is trained and its
condition fidelity compared, paired, with the untrained ControlNet. A reconstruction *leaks* when the
lower end of its SSIM interval is above the upper end of the no-information baseline's (the mean
public image), over all victims or within any timestep bucket; otherwise the configuration
*resists* that attack for that target.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from privdiff.errors import ConfigError
from privdiff.figures import plt, png_bytes
from privdiff.metrics.estimate import format_estimate
from privdiff.registry import Registry
from privdiff.runs.files import atomic_write_json, atomic_write_text
from privdiff.runs.folder import GRID_FILE, load_grid
from privdiff.runs.record import run_record
from privdiff.split.attacks import SPLIT_ATTACKS, attack_class
from privdiff.split.attacks.run import evaluate_attack
from privdiff.split.config import SplitConfig, load_split_config
from privdiff.split.models import load_public_models
from privdiff.split.run import simulate


@dataclass(frozen=True)
class ProtocolDefence:
    """A split-learning protocol configuration the grid attacks: its settings as config overrides."""

    name: str
    overrides: tuple[str, ...]
    note: str


DEFENCES: Registry[ProtocolDefence] = Registry("split defence")
for _defence in (
    ProtocolDefence("unprotected", ("protocol.t_start=0", "protocol.activation=identity", "protocol.precision=fp32"),
            "backward-free, no timestep policy, identity activation, fp32"),
    ProtocolDefence("published", (), "backward-free as published: t_start 5, symsigmoid, fp16, clean target"),
    ProtocolDefence("t_start=500", ("protocol.t_start=500",), "published, timestep policy t ≥ 500"),
    ProtocolDefence("noisy target s=0.5", ("protocol.target_noise=0.5", "protocol.latent_clip=16"),
            "published + target n + η (s = 0.5), ||z0|| clipped to 16 (about its typical norm)"),
    ProtocolDefence("hardened s=1 R=4, t≥500, condition noise", (
        "protocol.t_start=500", "protocol.target_noise=1", "protocol.latent_clip=4", "protocol.condition_clip=4",
        "protocol.condition_noise=4"),
        "t ≥ 500, target noise s = 1, ||z0|| ≤ 4, condition clipped to 4 plus N(0, 4²)"),
    ProtocolDefence("vanilla", ("protocol.design=vanilla",), "vanilla split learning (gradients go back)"),
):
    DEFENCES.register(_defence)
ATTACKS_BY_DESIGN = {"backward-free": ("analytic", "inverse-network", "unsplit"),
                     "vanilla": ("analytic", "inverse-network", "unsplit", "fsha")}
UTILITY_RECIPE = ("train.steps=600", "train.request_size=64", "train.batch_size=16", "train.passes=2",
                  "eval.num_samples=256")
VANILLA_UTILITY_RECIPE = ("train.steps=600", "train.request_size=16", "eval.num_samples=256")
# Budgets for a CPU grid (the attacks' own defaults are larger): UnSplit's image SSIM still rises
# past 400 iterations (0.75 -> 0.84 from 200 to 400, unprotected), so its cells are lower bounds.
ATTACK_OPTIONS = {"inverse-network": {"steps": 1500}, "unsplit": {"iterations": 400}, "fsha": {"rounds": 200}}


def leaks(attack: dict, baseline: dict) -> bool:
    """True when the attack's SSIM interval lies wholly above the baseline's."""
    return attack["ssim"]["ci"][0] > baseline["ssim"]["ci"][1]


def verdicts(entry: dict) -> dict[str, bool]:
    """Per target: does the attack leak overall or in any timestep bucket? (A protection that only
    holds at large t does not protect the examples drawn at small t.)"""
    out = {}
    for target, summary in entry["scores"].items():
        baseline = entry["references"]["baseline"][target]
        out[target] = any(leaks(summary[key], baseline[key]) for key in summary
                          if key in baseline and summary[key]["n"] > 1)
    return out


def _compact(outcome: dict) -> dict:
    keep = ("attack", "victims", "scores", "references", "latent_errors", "diagnostics", "fit_seconds",
            "reconstruct_seconds")
    out = {k: outcome[k] for k in keep}
    out["leaks"] = verdicts(out)
    return out


def _utility(config: SplitConfig, folder: Path, show_progress: bool) -> dict:
    config.output_dir = str(folder)
    summary = simulate(config, overwrite=True, show_progress=show_progress)
    fidelity = summary["condition_fidelity"]
    return {"steps": summary["steps"], "loss_first": summary["loss_first"], "loss_last": summary["loss_last"],
            "train_seconds": summary["train_seconds"], "num_samples": fidelity["num_samples"],
            "edge_ssim": {k: fidelity[k]["edge_ssim"]["value"] for k in ("untrained", "trained", "ceiling")},
            "paired": fidelity.get("trained_minus_untrained", {}),
            "local_privacy": summary.get("local_privacy")}


def run_grid(out: str | Path, *, base_overrides: list[str] | None = None, defences: list[str] | None = None,
             attack_names: list[str] | None = None, victims: int = 64, utility: bool = True,
             utility_overrides: list[str] | None = None, attack_options: dict | None = None,
             show_progress: bool = True) -> dict:
    """Runs the grid into `out` (split_attacks.json, split_attacks.md, split_attacks.png, utility runs).

    Rows of defences not chosen this time are kept from an earlier grid in the same folder, so a grid
    can be built (or one row re-run) one defence at a time."""
    out = Path(out)
    chosen = [d for d in DEFENCES.values() if defences is None or d.name in defences]
    if defences is not None and len(chosen) != len(set(defences)):
        unknown = sorted(set(defences) - set(DEFENCES))
        raise ConfigError(f"unknown defence(s) {unknown} (choose from {list(DEFENCES)})")
    out.mkdir(parents=True, exist_ok=True)
    previous = {r["defence"]: r for r in (load_grid(out) or {}).get("rows", [])}  # rows kept from a prior call
    base = list(base_overrides or [])
    options = {**ATTACK_OPTIONS, **(attack_options or {})}
    models = None
    done: dict[str, dict] = dict(previous)

    def ordered() -> list[dict]:
        order = list(DEFENCES)
        return sorted(done.values(), key=lambda r: order.index(r["defence"]) if r["defence"] in order else len(order))

    for defence in chosen:
        config = load_split_config(None, base + list(defence.overrides))
        models = models or load_public_models(config.model.pretrained)
        names = [a for a in ATTACKS_BY_DESIGN[config.protocol.design] if attack_names is None or a in attack_names]
        row = {"defence": defence.name, "note": defence.note, "overrides": list(defence.overrides),
               "design": config.protocol.design, "attacks": {}}
        for name in names:
            began = time.perf_counter()
            attack = attack_class(name)(**options.get(name, {}))
            outcome = evaluate_attack(attack, config, models, victims=victims, seed=config.train.seed)
            row["attacks"][name] = _compact(outcome.result)
            if show_progress:
                s = outcome.result["scores"]
                print(f"[{defence.name}] {name}: " + ", ".join(
                    f"{k} SSIM {v['all']['ssim']['value']:.3f}" for k, v in s.items())
                      + f" ({time.perf_counter() - began:.0f} s)", flush=True)
        if utility:
            recipe = VANILLA_UTILITY_RECIPE if config.protocol.design == "vanilla" else UTILITY_RECIPE
            utility_config = load_split_config(None, base + list(recipe) + list(utility_overrides or [])
                                               + list(defence.overrides))
            row["utility"] = _utility(utility_config, out / "utility" / defence.name.replace(" ", "_").replace("=", "-")
                                      .replace(",", ""), show_progress)
        done[defence.name] = row
        atomic_write_json(out / GRID_FILE, {"rows": ordered(), "victims": victims, "record": run_record()})
    for row in done.values():  # kept rows too: one rule for the whole table
        for entry in row["attacks"].values():
            entry["leaks"] = verdicts(entry)
    grid = {"rows": ordered(), "victims": victims, "record": run_record(), "attack_options": options,
            "rule": "leaks = the attack's SSIM interval lies wholly above the mean-public-image baseline's, "
                    "over all victims or within any timestep bucket"}
    atomic_write_json(out / GRID_FILE, grid)
    atomic_write_text(out / "split_attacks.md", markdown_table(grid))
    (out / "split_attacks.png").write_bytes(grid_figure(grid))
    return grid


def _cell(entry: dict | None, target: str) -> str:
    if entry is None or target not in entry["scores"]:
        return "—"
    value = entry["scores"][target]["all"]["ssim"]
    verdict = "**leaks**" if entry["leaks"][target] else "resists"
    return f"{value['value']:.2f} {verdict}"


def attacks_in(rows: list[dict]) -> list[str]:
    """The attacks that appear in any row, passive ones first, then FSHA (the table's columns)."""
    order = list(dict.fromkeys([*ATTACKS_BY_DESIGN["vanilla"], *SPLIT_ATTACKS]))
    return [a for a in order if any(a in r["attacks"] for r in rows)]


def reference_ssim(row: dict, kind: str, target: str) -> float:
    """The row's baseline or ceiling SSIM (the same for every attack of the row; NaN without attacks)."""
    entry = next(iter(row["attacks"].values()), None)
    return entry["references"][kind][target]["all"]["ssim"]["value"] if entry else math.nan


def worst_client(row: dict) -> dict | None:
    """The client with the largest accounted μ of the row's utility run (None: no guarantee to report)."""
    privacy = (row.get("utility") or {}).get("local_privacy")
    if not privacy:
        return None
    return {**max(privacy["clients"].values(), key=lambda c: c.get("worst_image_mu", 0)), "delta": privacy["delta"]}


def utility_cell(utility: dict | None) -> str:
    """Paired condition-fidelity gains (edge SSIM; disk IoU) of the configuration's trained ControlNet."""
    paired = (utility or {}).get("paired", {})
    if not paired:
        return "not measured"
    return "; ".join(format_estimate(p, "+.3f") for metric in ("edge_ssim", "disk_iou") if (p := paired.get(metric)))


def markdown_table(grid: dict) -> str:
    """The docs/split.md / report table: per defence, each attack's image and condition SSIM and verdict,
    the baseline and ceiling, the utility and the accounted ε."""
    attacks = attacks_in(grid["rows"])
    head = ["defence"] + [f"{a} image / condition" for a in attacks] + \
        ["baseline / ceiling SSIM", "utility, trained − untrained [95 % CI]: edge SSIM; disk IoU", "ε per sample (δ)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in grid["rows"]:
        cells = [row["defence"]]
        for a in attacks:
            entry = row["attacks"].get(a)
            cells.append("—" if entry is None else f"{_cell(entry, 'image')} / {_cell(entry, 'condition')}")
        cells.append("—" if not row["attacks"] else " / ".join(
            ", ".join(f"{reference_ssim(row, kind, target):.2f}" for target in ("image", "condition"))
            for kind in ("baseline", "ceiling")))
        cells.append(utility_cell(row.get("utility")))
        worst = worst_client(row)
        cells.append("none" if worst is None else f"image {worst['worst_image_epsilon']:.3g}, total "
                     f"{worst['worst_epsilon']:.3g} ({worst['delta']:g})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def grid_figure(grid: dict) -> bytes:
    """Bars: SSIM of each attack's image and condition reconstructions per defence, with the baseline."""
    rows = grid["rows"]
    attacks = attacks_in(rows)
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), sharey=True)
    width = 0.8 / max(1, len(attacks))
    for ax, target in zip(axes, ("image", "condition")):
        x = np.arange(len(rows))
        for i, a in enumerate(attacks):
            values = [r["attacks"].get(a, {}).get("scores", {}).get(target, {}).get("all", {}).get("ssim", {})
                      .get("value", np.nan) for r in rows]
            ax.bar(x + i * width - 0.4 + width / 2, values, width, label=a)
        baseline = [reference_ssim(r, "baseline", target) for r in rows]
        ceiling = [reference_ssim(r, "ceiling", target) for r in rows]
        ax.scatter(x, baseline, marker="_", s=400, color="black", label="baseline (mean public image)", zorder=3)
        ax.scatter(x, ceiling, marker="_", s=400, color="grey", label="ceiling (autoencoder)", zorder=3)
        ax.set_xticks(x, [r["defence"] for r in rows], rotation=20, ha="right", fontsize=7)
        ax.set_title(f"{target} reconstruction SSIM")
    axes[0].set_ylabel("SSIM")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a bar
    fig.tight_layout()
    return png_bytes(fig)


__all__ = ["ATTACK_OPTIONS", "ATTACKS_BY_DESIGN", "DEFENCES", "ProtocolDefence", "attacks_in", "grid_figure",
           "leaks", "markdown_table", "reference_ssim", "run_grid", "utility_cell", "verdicts",
           "worst_client"]
