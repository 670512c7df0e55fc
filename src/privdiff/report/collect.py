"""Reading run folders into the plain data a report is made of (also written as report.json)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from privdiff.audit.roc import paired_auc_difference
from privdiff.errors import ConfigError
from privdiff.evaluation import record_key
from privdiff.runs.folder import load_grid, load_weights_attack, open_run, read_json


def collect_run(path: str | Path) -> dict:
    """One run's figures: settings, privacy, metric records, training history and image paths."""
    run = open_run(path)
    cfg = run.config
    metrics = read_json(run.path / "metrics.json") or {}
    audit = read_json(run.path / "audit" / "audit.json")
    control = read_json(run.path / "audit" / "control" / "audit.json")
    eval_grid = run.path / "eval" / "samples.png"
    return {
        "name": run.name,
        "path": str(run.path),
        "method": run.summary.get("method", cfg.train.method),
        "dataset": run.summary.get("dataset", {}),
        "membership": run.summary.get("membership", {}),
        "pretrained": run.summary.get("pretrained"),
        "settings": run.summary.get("settings") or {},  # what ran, as the run recorded it
        "privacy": run.summary.get("privacy") or {},
        "wall_time_s": run.summary.get("wall_time_s"),
        "runtime": run.summary.get("runtime") or {},  # device and frozen-weight precision of the training
        "git_commit": run.summary.get("git_commit"),
        "metrics": {record_key(r): r for r in metrics.get("records", [])},
        "eval_config": metrics.get("config"),
        "extractor": metrics.get("extractor"),
        "history": run.history,
        "epochs": run.epoch_log(),
        "smp": run.summary.get("smp"),
        "early_stopped": run.summary.get("early_stopped"),
        "audit": audit,
        "control_audit": control,
        "images": {"samples": str(run.path / "samples.png") if (run.path / "samples.png").is_file() else None,
                   "eval_samples": str(eval_grid) if eval_grid.is_file() else None,
                   "roc": str(roc) if (roc := run.path / "audit" / "roc_loglog.png").is_file() else None},
    }


def collect(paths: list[str | Path]) -> dict:
    """Fine-tuning runs, plus split-learning attack grids (folders holding split_attacks.json) and
    weights-attack runs (folders whose attack.json is of kind `weights-attack`)."""
    if not paths:
        raise ConfigError("report: give at least one run folder")
    grids, weights = [], []
    run_paths = []
    for p in paths:
        grid = load_grid(p)
        weights_result = load_weights_attack(p)
        if grid is not None:
            grids.append({"name": Path(p).name, "path": str(p), **grid})
        elif weights_result is not None:
            weights.append({"name": Path(p).name, "path": str(p), **weights_result})
        else:
            run_paths.append(p)
    runs = [collect_run(p) for p in run_paths]
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):  # two folders with one name: qualify by parent
        for r in runs:
            r["name"] = f"{Path(r['path']).parent.name}/{r['name']}"
    keys = []
    for r in runs:
        keys += [k for k in r["metrics"] if k not in keys]
    return {"runs": runs, "metric_keys": keys, "matched": matched_comparisons(runs), "split_attacks": grids,
            "weights_attacks": weights}


def _scores(run: dict) -> dict | None:
    path = Path(run["path"]) / "audit" / "scores.npz"
    if not path.is_file():
        return None
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def matched_comparisons(runs: list[dict], resamples: int = 1000) -> list[dict]:
    """For each early-stopped run in the report: the defended run's best attack (chosen on aux), its
    AUC minus the same attack's AUC on the early-stopped and on the full run, with paired bootstrap
    intervals over the shared test examples (smp-lora spec §8.3-8.4)."""
    by_path = {r["path"]: r for r in runs}
    out = []
    for early in runs:
        match = early.get("early_stopped")
        defended = by_path.get(match["matched_to"]) if match else None
        if defended is None or not defended["audit"]:
            continue
        attack = defended["audit"]["best_attack"]
        scores = _scores(defended)
        row = {"defended": defended["name"], "attack": attack, "resamples": resamples, "differences": {}}
        for name, other in (("early-stopped", early), ("full", by_path.get(match["from_run"]))):
            theirs = _scores(other) if other else None
            if scores is None or theirs is None or attack not in theirs or \
                    list(theirs["ids"]) != list(scores["ids"]):
                continue
            row["differences"][name] = {"run": other["name"], **paired_auc_difference(
                scores[attack], theirs[attack], scores["labels"], resamples=resamples)}
        out.append(row)
    return out
