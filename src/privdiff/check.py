"""`privdiff check`: a release gate for a LoRA file, one verdict per axis (docs/check.md).

- **header**: `privdiff inspect` on the file; fails on a finding at or above the chosen severity.
- **membership**: the membership audit of the file against the training run's manifest (the cheap,
  shadow-free attacks by default; `thorough` adds RMIA and LiRA with shadows trained with the run's
  recipe); the best attack is chosen by aux AUC, as in `privdiff audit`. Passes when its test AUC
  interval contains 0.5 (up to a margin), or when its TPR at 1 % FPR is resolved (>= 100 test
  non-members) and below a bound.
- **identity**: for files on the shipped face base, the weights attack with the shipped encoder;
  fails when its images resemble the training images more than the encoder's own lower bound (a
  random prompt embedding) does. Not applicable on other bases.
A DP guarantee in the header (`privdiff.dp.epsilon`) is stated, and gated when a maximum ε is set.

Writes OUT/check.json and OUT/check.html, each atomically.
"""

from __future__ import annotations

import html
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from PIL import Image

from privdiff.audit.attacks import ATTACKS, CHEAP_ATTACKS
from privdiff.audit.roc import fpr_resolution
from privdiff.audit.run import AuditConfig, attack_target, audit_target
from privdiff.audit.shadows import train_shadows
from privdiff.config import RuntimeConfig
from privdiff.errors import ConfigError
from privdiff.models.inspect import inspect_file, read_header
from privdiff.models.load import FACE_BASE_DIR
from privdiff.runs.files import atomic_write_json, atomic_write_text
from privdiff.runs.folder import RunFolder, open_run
from privdiff.runs.record import run_record
from privdiff.runtime import resolve_runtime
from privdiff.training.run import run_dataset, run_manifest
from privdiff.weights.run import attack_adapter
from privdiff.weights.shipped import SHIPPED_ATTACK_DIR

THOROUGH_ATTACKS = ("rmia", "lira-online", "lira-offline")


@dataclass
class CheckThresholds:
    """What fails the gate (defaults documented in docs/check.md)."""

    header_fail_on: Literal["medium", "high"] = "medium"  # any counted, seed, time, name... finding fails
    auc_margin: float = 0.0        # membership passes when the best attack's AUC CI low end <= 0.5 + margin
    max_tpr_at_1_fpr: float = 0.05  # ... or when its TPR@1%FPR (resolved only) is <= this
    max_epsilon: float | None = None  # when set: the header must carry a DP guarantee with epsilon <= this

    def validate(self) -> CheckThresholds:
        """Raises ConfigError on the first invalid value."""
        if self.header_fail_on not in ("medium", "high"):
            raise ConfigError(f"check: header_fail_on must be medium or high, got {self.header_fail_on!r}")
        if not 0 <= self.auc_margin < 0.5:
            raise ConfigError(f"check: auc_margin must be in [0, 0.5), got {self.auc_margin}")
        if not 0 <= self.max_tpr_at_1_fpr <= 1:
            raise ConfigError(f"check: max_tpr_at_1_fpr must be in [0, 1], got {self.max_tpr_at_1_fpr}")
        if self.max_epsilon is not None and not self.max_epsilon > 0:
            raise ConfigError(f"check: max_epsilon must be > 0, got {self.max_epsilon}")
        return self


@dataclass
class CheckConfig:
    thorough: bool = False   # add RMIA and LiRA (trains `shadows` shadows with the run's recipe)
    shadows: int = 4
    attacks: list[str] | None = None  # overrides the attack list (default: cheap, + thorough ones)
    audit_seed: int = 0
    bootstrap: int = 1000
    identity: bool = True    # run the weights attack on face-base files
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    thresholds: CheckThresholds = field(default_factory=CheckThresholds)

    def attack_names(self) -> list[str]:
        names = list(self.attacks) if self.attacks else list(CHEAP_ATTACKS) + (list(THOROUGH_ATTACKS) if self.thorough else [])
        unknown = next((a for a in names if a not in ATTACKS), None)
        if unknown is not None:
            raise ConfigError(f"unknown attack '{unknown}' (choose from {', '.join(ATTACKS)})")
        return names


def dp_guarantee(metadata: dict[str, str]) -> dict | None:
    """The `privdiff.dp.*` guarantee of a header, numbers parsed; None when the file carries none."""
    if "privdiff.dp.epsilon" not in metadata:
        return None
    def number(key: str) -> float | None:
        try:
            return float(metadata[key])
        except (KeyError, ValueError):
            return None
    return {"epsilon": number("privdiff.dp.epsilon"), "delta": number("privdiff.dp.delta"),
            "accountant": metadata.get("privdiff.dp.accountant"), "unit": metadata.get("privdiff.dp.unit")}


def header_axis(adapter: Path, thresholds: CheckThresholds) -> dict:
    report = inspect_file(adapter)
    failing = ("high",) if thresholds.header_fail_on == "high" else ("high", "medium")
    bad = [f for f in report["findings"] if f["severity"] in failing]
    return {"verdict": "fail" if bad else "pass", "failing_findings": len(bad), "findings": report["findings"],
            "rule": f"no {' or '.join(failing)} finding in the header (privdiff inspect)"}


def membership_axis(records: dict[str, dict], n_nonmembers: int, thresholds: CheckThresholds) -> dict:
    best = max(records, key=lambda n: records[n]["aux_auc"])
    record = records[best]
    auc_low = record["auc"]["ci"][0]
    resolved = fpr_resolution(n_nonmembers)["0.01"]["resolved"]
    tpr1 = record["tpr_at_fpr"]["0.01"]["value"]
    near_chance = auc_low <= 0.5 + thresholds.auc_margin
    low_tpr = resolved and tpr1 <= thresholds.max_tpr_at_1_fpr
    reasons = []
    if near_chance:
        reasons.append(f"AUC interval low end {auc_low:.3f} <= {0.5 + thresholds.auc_margin:.3f}")
    if low_tpr:
        reasons.append(f"TPR@1%FPR {tpr1:.3f} <= {thresholds.max_tpr_at_1_fpr}")
    if not reasons:
        reasons.append(f"AUC interval low end {auc_low:.3f} > {0.5 + thresholds.auc_margin:.3f}"
                       + (f" and TPR@1%FPR {tpr1:.3f} > {thresholds.max_tpr_at_1_fpr}" if resolved else
                          f"; TPR@1%FPR unresolved ({n_nonmembers} test non-members < 100)"))
    return {"verdict": "pass" if near_chance or low_tpr else "fail", "best_attack": best,
            "best_attack_rule": "highest AUC on the auxiliary split", "auc": record["auc"],
            "tpr_at_1_fpr": record["tpr_at_fpr"]["0.01"], "tpr_at_1_fpr_resolved": resolved,
            "tpr_at_5_fpr": record["tpr_at_fpr"]["0.05"], "why": "; ".join(reasons),
            "attacks": {n: {"auc": r["auc"], "aux_auc": r["aux_auc"], "tpr_at_fpr": r["tpr_at_fpr"],
                            "queries_per_example": r["queries_per_example"], "access": r["access"]}
                        for n, r in records.items()}}


def is_face_base(run: RunFolder, base_model: str | None) -> bool:
    chosen = base_model or run.config.model.pretrained
    return chosen is not None and Path(chosen).resolve() == FACE_BASE_DIR.resolve()


def identity_axis(adapter: Path, run: RunFolder, out: Path) -> dict:
    """The shipped weights attack on the file; its images against the run's member images."""
    private = out / "identity" / "private"
    dataset, manifest = run_dataset(run), run_manifest(run)
    members = dataset.subset(manifest.ids("member_aux") + manifest.ids("member_test"))
    private.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, example in enumerate(members.examples):
        Image.fromarray(example.image).save(private / f"{k:04d}.png")
        lines.append(json.dumps({"file_name": f"{k:04d}.png", "text": example.caption}))
    atomic_write_text(private / "metadata.jsonl", "\n".join(lines) + "\n")
    result = attack_adapter(None, adapter, out / "identity", private=private, overwrite=True)
    lower = yaml.safe_load((SHIPPED_ATTACK_DIR / "RECIPE.yaml").read_text())["identity_similarity"]["random_embedding"]
    similarity = result["identity_similarity_to_private"]
    return {"verdict": "fail" if similarity > lower["ci"][1] else "pass", "identity_similarity": similarity,
            "lower_bound": lower, "rule": "attack images no closer to the training identity than a random "
                                          "prompt embedding (upper end of its interval, shipped encoder)"}


def run_check(adapter: str | Path, data: str | Path, out: str | Path, cfg: CheckConfig | None = None, *,
              base_model: str | None = None, show_progress: bool = True) -> dict:
    """Gates one LoRA file: header, membership and (face bases) identity; writes check.json and check.html.

    Args:
        adapter: the .safetensors file to be published.
        data: the fine-tuning run folder it came from (its dataset, membership manifest, base and recipe).
        base_model: another base model folder than the run's.

    Raises:
        ConfigError: `data` is no finished run folder, or a setting is invalid.
        ModelError: the file is no readable LoRA for the base.
    """
    began = time.perf_counter()
    cfg = cfg or CheckConfig()
    cfg.thresholds.validate()
    adapter, out = Path(adapter), Path(out)
    names = cfg.attack_names()
    _, metadata, _ = read_header(adapter)
    if not (Path(data) / "config.yaml").is_file() or not (Path(data) / "membership.json").is_file():
        raise ConfigError(f"--data {data}: not a fine-tuning run folder (config.yaml and membership.json)")
    run = open_run(data)
    audit_cfg = AuditConfig(attacks=names, audit_seed=cfg.audit_seed, shadows=cfg.shadows, bootstrap=cfg.bootstrap,
                            runtime=cfg.runtime).validate()

    axes = {"header": header_axis(adapter, cfg.thresholds)}
    target = audit_target(run, audit_cfg, adapter=adapter, base_model=base_model)
    shadows = None
    if any(ATTACKS[a].needs_shadows for a in names):
        shadows = train_shadows(run, cfg.shadows, cfg.audit_seed, out / "shadows", show_progress,
                                resolve_runtime(cfg.runtime))
    results = attack_target(target, audit_cfg, shadows, show_progress)
    n1, n0 = len(target.data["member_test"]), len(target.data["nonmember_test"])
    axes["membership"] = {**membership_axis({n: r["record"] for n, r in results.items()}, n0, cfg.thresholds),
                          "n_members_test": n1, "n_nonmembers_test": n0, "fpr_resolution": fpr_resolution(n0)}
    if cfg.identity and is_face_base(run, base_model):
        axes["identity"] = identity_axis(adapter, run, out)
    else:
        axes["identity"] = {"verdict": "n/a", "rule": "only files on the shipped face base are attacked "
                                                       "(the shipped encoder fits no other layout)"}
    guarantee = dp_guarantee(metadata)
    dp = {"guarantee": guarantee, "verdict": "n/a"}
    if cfg.thresholds.max_epsilon is not None:
        eps = None if guarantee is None else guarantee["epsilon"]
        ok = eps is not None and math.isfinite(eps) and eps <= cfg.thresholds.max_epsilon
        dp["verdict"] = "pass" if ok else "fail"
    axes["dp"] = dp
    failed = [name for name, axis in axes.items() if axis["verdict"] == "fail"]
    result = {"adapter": str(adapter), "data": str(run.path), "base": base_model or run.config.model.pretrained,
              "verdict": "fail" if failed else "pass", "failed_axes": failed, "axes": axes,
              "thresholds": asdict(cfg.thresholds), "attacks": names, "thorough": cfg.thorough,
              "shadows": cfg.shadows if shadows is not None else 0, **run_record(),
              "wall_time_s": round(time.perf_counter() - began, 3)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "check.json", result)
    atomic_write_text(out / "check.html", check_card(result))
    return result


def _cell(value: object) -> str:
    return html.escape(str(value))


def check_card(result: dict) -> str:
    """A short self-contained HTML card: one row per axis with its verdict and the figures behind it."""
    colours = {"pass": "#1a7f37", "fail": "#cf222e", "n/a": "#6e7781"}
    axes = result["axes"]
    m = axes["membership"]
    guarantee = axes["dp"]["guarantee"]
    rows = [
        ("header", axes["header"]["verdict"], (f"{axes['header']['failing_findings']} failing finding(s) of "
                                               f"{len(axes['header']['findings'])}; rule: {axes['header']['rule']}")),
        ("membership", m["verdict"], (f"best attack {m['best_attack']}: AUC {m['auc']['value']:.3f} "
                                      f"[{m['auc']['ci'][0]:.3f}, {m['auc']['ci'][1]:.3f}], TPR@1%FPR "
                                      f"{m['tpr_at_1_fpr']['value']:.3f}"
                                      f"{'' if m['tpr_at_1_fpr_resolved'] else ' (unresolved)'}, "
                                      f"{m['n_members_test']} members / {m['n_nonmembers_test']} non-members; "
                                      f"{m['why']}")),
        ("identity", axes["identity"]["verdict"], axes["identity"].get("rule", "")),
        ("DP guarantee", axes["dp"]["verdict"], "none in the header" if guarantee is None else
         f"(ε = {guarantee['epsilon']:.3g}, δ = {guarantee['delta']:.3g}) per {guarantee['unit'] or 'example'}"),
    ]
    body = "".join(f"<tr><td>{_cell(name)}</td><td style='color:{colours.get(v, '#000')};font-weight:bold'>"
                   f"{_cell(v.upper())}</td><td>{_cell(text)}</td></tr>" for name, v, text in rows)
    verdict = result["verdict"]
    return (f"<!doctype html><meta charset='utf-8'><title>privdiff check: {_cell(Path(result['adapter']).name)}</title>"
            "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td{padding:.3em .8em;"
            "border-bottom:1px solid #ddd;vertical-align:top}</style>"
            f"<h1>privdiff check: <span style='color:{colours[verdict]}'>{verdict.upper()}</span></h1>"
            f"<p>{_cell(result['adapter'])} against {_cell(result['data'])}</p><table>{body}</table>"
            f"<p>Attacks: {_cell(', '.join(result['attacks']))}; privdiff {_cell(result.get('privdiff_version', ''))}, "
            f"{result['wall_time_s']:.0f} s.</p>")


__all__ = ["THOROUGH_ATTACKS", "CheckConfig", "CheckThresholds", "check_card", "dp_guarantee", "run_check"]
