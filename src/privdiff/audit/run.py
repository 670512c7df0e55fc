"""`privdiff audit`: every attack on one run, fitted on aux, evaluated on test (membership-audit.md §8 outputs)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from privdiff.audit.attacks import (
    ATTACKS,
    DEFAULT_ATTACKS,
    Attack,
    ShadowSet,
)
from privdiff.audit.bounds import clopper_pearson_eps
from privdiff.audit.model import Candidates, Denoiser
from privdiff.audit.plots import roc_plot
from privdiff.audit.roc import (
    attack_metrics,
    fpr_resolution,
    null_auc_sd,
    roc_curve,
    stratified_bootstrap,
    tpr_interval_at_threshold,
)
from privdiff.audit.shadows import train_shadows
from privdiff.config import (
    ConfigRoot,
    RuntimeConfig,
    choice_checks,
    raise_first_failure,
)
from privdiff.diffusion.cache import EncodingCache, open_encoding_cache
from privdiff.diffusion.task import encode_split
from privdiff.distributed import current_world
from privdiff.errors import ConfigError
from privdiff.metrics.estimate import Estimate
from privdiff.models.load import load_pipeline
from privdiff.models.lora import load_lora_into_unet
from privdiff.runs.files import atomic_replace, atomic_write_json
from privdiff.runs.folder import RunFolder, open_run
from privdiff.runs.record import run_record
from privdiff.runtime import resolve_runtime
from privdiff.training.run import run_dataset, run_manifest, run_pipeline

CAVEATS = [
    "Members and non-members are drawn from one distribution by the manifest; a user-supplied split "
    "must pass the control check (base model at chance) before its numbers mean anything.",
    "Small-data, many-epoch fine-tuning is where membership attacks are strong; results do not transfer "
    "to large pre-training.",
    "Sample sizes bound what can be claimed: the smallest non-zero FPR is 1/n_nonmembers, and the "
    "certifiable epsilon is capped by the test-set size.",
    "Timesteps, thresholds and the best attack are chosen on the auxiliary split, never on test.",
    "Defended models must be audited with shadows trained under the same defence (adaptive attacks).",
    "AUC and ASR are reported for comparison with diffusion-MIA papers; TPR at low FPR is the worst case.",
]


@dataclass
class AuditConfig(ConfigRoot):
    attacks: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKS))
    audit_seed: int = 0
    shadows: int = 8            # for lira-online / lira-offline; must be even
    bootstrap: int = 1000
    cp_fpr: float = 0.05        # FPR targeted on aux by the threshold of the Clopper-Pearson bound
    batch_size: int = 256
    control: bool = False       # audit the base model without the adapter (must be at chance)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # the audit's and its shadows' device
    cache: bool = True          # read and write encodings in the run's encoding cache (--no-cache: false)

    def validate(self) -> AuditConfig:
        """Raises ConfigError on the first invalid value."""
        # attacks stay a list of names, not Literals: the registry in `privdiff.audit.attacks` is the truth
        unknown = next((a for a in self.attacks if a not in ATTACKS), None)
        raise_first_failure([
            *choice_checks(self),
            (unknown is None, f"unknown attack '{unknown}' (choose from {', '.join(ATTACKS)})"),
            (bool(self.attacks), "audit: no attacks selected"),
            (unknown is not None or not any(ATTACKS[a].needs_shadows for a in self.attacks)
             or (self.shadows >= 2 and self.shadows % 2 == 0),
             f"audit: --shadows must be even and >= 2 for LiRA, got {self.shadows}"),
            (self.bootstrap >= 20, "audit: bootstrap must be >= 20 resamples"),
            (0 <= self.cp_fpr <= 1, "audit: cp_fpr must be in [0, 1]"),
            (self.batch_size >= 1, "audit: batch_size must be >= 1"),
        ])
        return self


def audit_cache(run: RunFolder, enabled: bool) -> EncodingCache:
    """The encoding cache of `run` (its `cache.dir`), or an in-memory one when not `enabled`."""
    return open_encoding_cache(enabled, run.config.cache.dir)


def encode_candidates(run: RunFolder, pipe, roles: tuple[str, ...], cache: EncodingCache) -> dict[str, Candidates]:
    dataset, manifest = run_dataset(run), run_manifest(run)
    out = {}
    for role in roles:
        subset = dataset.subset(manifest.ids(role))
        if len(subset) == 0:
            raise ConfigError(f"{run.path}: the manifest has no '{role}' examples to audit")
        out[role] = encode_split(pipe, subset, Candidates, cache)
    return out


def evaluate_attack(attack: Attack, model: Denoiser, data: dict[str, Candidates], cfg: AuditConfig,
                    shadows: ShadowSet | None = None, base: Denoiser | None = None) -> dict:
    """Fit on aux (and the shadows or the base model, for attacks that use them), score test, and every
    figure of membership-audit.md §5 with its interval and sample sizes."""
    began = time.perf_counter()
    attack.fit(model, data["member_aux"], data["nonmember_aux"], shadows=shadows, base=base)
    fit_s = time.perf_counter() - began
    aux = Candidates.join(data["member_aux"], data["nonmember_aux"])
    aux_labels = np.r_[np.ones(len(data["member_aux"])), np.zeros(len(data["nonmember_aux"]))]
    aux_scores = attack.score(model, aux)
    test = Candidates.join(data["member_test"], data["nonmember_test"])
    labels = np.r_[np.ones(len(data["member_test"])), np.zeros(len(data["nonmember_test"]))]
    began = time.perf_counter()
    scores = attack.score(model, test)
    score_s = time.perf_counter() - began
    metrics = attack_metrics(scores, labels)
    ci = stratified_bootstrap(scores, labels, resamples=cfg.bootstrap, seed=cfg.audit_seed)
    # Thresholds fixed on aux, applied to test: balanced accuracy, and the FPR target of the CP bound.
    fpr_a, tpr_a, thr_a = roc_curve(aux_scores, aux_labels)
    balanced = thr_a[1:][np.argmax(((tpr_a + 1 - fpr_a) / 2)[1:])]
    at_balanced = tpr_interval_at_threshold(scores, labels, balanced)
    ok = fpr_a[1:] <= cfg.cp_fpr
    cp_threshold = thr_a[1:][ok][np.argmax(tpr_a[1:][ok])] if ok.any() else np.inf
    at_cp = tpr_interval_at_threshold(scores, labels, cp_threshold)
    aux_auc = attack.fitted.get("aux_auc")
    if aux_auc is None:
        aux_auc = attack_metrics(aux_scores, aux_labels).auc
    n = len(labels)
    record = {
        "auc": Estimate(metrics.auc, *ci["auc"], n).to_json(), "asr": Estimate(metrics.asr, *ci["asr"], n).to_json(),
        "asr_aux_threshold": (at_balanced["tp"] + len(data["nonmember_test"]) - at_balanced["fp"]) / len(labels),
        "tpr_at_fpr": {level: Estimate(tpr, *ci[f"tpr@{level}"], metrics.n_members).to_json()
                       for level, tpr in metrics.tpr_at_fpr.items()},
        "tpr_at_fpr_conservative": metrics.tpr_at_fpr_conservative,
        "resolution_limited": metrics.resolution_limited,
        "tpr_at_aux_threshold": at_cp, "aux_auc": aux_auc,
        "queries_per_example": attack.queries_per_example(), "access": attack.access,
        "fitted": {k: v for k, v in attack.fitted.items() if k != "aux_auc_by_value"},
        "aux_auc_by_value": attack.fitted.get("aux_auc_by_value"),
        "examples_per_second": len(labels) / score_s if score_s > 0 else None,
        "fit_seconds": fit_s, "n_members": metrics.n_members, "n_nonmembers": metrics.n_nonmembers,
    }
    if hasattr(attack, "margins"):  # the proxy with R = 1, for parity with the reference
        record["auc_r1"] = attack_metrics(attack.margins(model, test)[0], labels).auc
    return {"record": record, "scores": scores, "labels": labels, "ids": test.ids}


@dataclass
class AuditTarget:
    """What an audit attacks: the target denoiser, the base model (no adapter; loaded only when an
    attack needs it) and the four manifest roles as candidates."""

    model: Denoiser
    base: Denoiser | None
    data: dict[str, Candidates]


def audit_target(run: RunFolder, cfg: AuditConfig, adapter: Path | None = None, base_model: str | None = None) -> AuditTarget:
    """Loads the run's adapted model (or `adapter` on the run's base, or the bare base with
    `cfg.control`) and encodes the manifest's roles. `base_model`: another base than the run's."""
    runtime = resolve_runtime(cfg.runtime)
    pretrained = base_model or run.config.model.pretrained
    if cfg.control:
        pipe = load_pipeline(pretrained, device=runtime.device, dtype=runtime.dtype)
    elif adapter is not None or base_model is not None:  # a file from elsewhere: its own header's LoRA config
        pipe = load_pipeline(pretrained, device=runtime.device, dtype=runtime.dtype)
        load_lora_into_unet(pipe.unet, adapter or run.adapter_path)
        pipe.unet.eval()
    else:
        pipe = run_pipeline(run, runtime=runtime)
    model = Denoiser(pipe.unet, pipe.scheduler, cfg.batch_size)
    base = None
    if any(ATTACKS[a].needs_base for a in cfg.attacks):
        base_pipe = pipe if cfg.control else load_pipeline(pretrained, device=runtime.device, dtype=runtime.dtype)
        base = Denoiser(base_pipe.unet.eval(), base_pipe.scheduler, cfg.batch_size)
    data = encode_candidates(run, pipe, ("member_aux", "member_test", "nonmember_aux", "nonmember_test"),
                             audit_cache(run, cfg.cache))
    return AuditTarget(model, base, data)


def attack_target(target: AuditTarget, cfg: AuditConfig, shadows: ShadowSet | None = None,
                  show_progress: bool = True) -> dict[str, dict]:
    """`evaluate_attack` for every attack of `cfg`, by name."""
    from rich.progress import Progress

    results = {}
    with Progress(disable=not show_progress, transient=True) as progress:
        bar = progress.add_task("auditing", total=len(cfg.attacks))
        for name in cfg.attacks:
            progress.update(bar, description=f"attack: {name}")
            results[name] = evaluate_attack(ATTACKS[name](cfg.audit_seed), target.model, target.data, cfg, shadows,
                                            target.base)
            progress.advance(bar)
    return results


def run_audit(run_dir: str | Path, cfg: AuditConfig | None = None, *, show_progress: bool = True,
              shadows: ShadowSet | None = None) -> dict | None:
    """Audits a finished run; writes RUN_DIR/audit/{audit.json, scores.npz, roc_loglog.png}.

    Under torchrun (a process group joined) the LiRA shadows are a farm: every process trains its
    share, and only the main process audits and writes (the others return None).
    """
    began = time.perf_counter()
    cfg = (cfg or AuditConfig()).validate()
    runtime = resolve_runtime(cfg.runtime)  # an unusable device is refused before anything is read
    run = open_run(run_dir)
    needs_shadows = any(ATTACKS[a].needs_shadows for a in cfg.attacks) and shadows is None
    if not current_world().is_main:
        if needs_shadows:
            train_shadows(run, cfg.shadows, cfg.audit_seed, run.path / "audit" / "shadows", False, runtime,
                          cache=cfg.cache)
        return None
    target = audit_target(run, cfg)
    data = target.data
    out_dir = run.path / "audit" / ("control" if cfg.control else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    if needs_shadows:
        shadows = train_shadows(run, cfg.shadows, cfg.audit_seed, run.path / "audit" / "shadows", show_progress,
                                runtime, cache=cfg.cache)
    results = attack_target(target, cfg, shadows, show_progress)

    records = {name: r["record"] for name, r in results.items()}
    best = max(records, key=lambda n: records[n]["aux_auc"])
    privacy = run.summary.get("privacy") or {}
    delta = float(privacy.get("delta", 0.0))
    at = records[best]["tpr_at_aux_threshold"]
    cp = clopper_pearson_eps(at["tp"], at["n_members"], at["fp"], at["n_nonmembers"], delta=delta)
    n1, n0 = len(data["member_test"]), len(data["nonmember_test"])
    audit = {
        "run": str(run.path), "target": "base model, no adapter (control)" if cfg.control else "fine-tuned adapter",
        "manifest_hash": run_manifest(run).dataset_hash, "audit_seed": cfg.audit_seed,
        "config": cfg.to_dict(), "n_members_test": n1, "n_nonmembers_test": n0,
        "n_members_aux": len(data["member_aux"]), "n_nonmembers_aux": len(data["nonmember_aux"]),
        "null_auc_sd": null_auc_sd(n1, n0), "fpr_resolution": fpr_resolution(n0), "attacks": records, "best_attack": best,
        "best_attack_rule": "highest AUC on the auxiliary split",
        "eps_lower_bound": {"cp": {**cp, "attack": best, "threshold_fpr_on_aux": cfg.cp_fpr,
                                   "tp": at["tp"], "fp": at["fp"], "n_members": at["n_members"],
                                   "n_nonmembers": at["n_nonmembers"], "indicative": True,
                                   "note": "many examples of one training run are not independent trials: "
                                           "indicative leakage scale only (the one-run canary audit is the "
                                           "rigorous single-run bound)"},
                            "one_run": None},
        "claimed_epsilon": privacy.get("epsilon"), "caveats": CAVEATS, **run_record(),
        "wall_time_s": round(time.perf_counter() - began, 3),
    }
    ids = results[cfg.attacks[0]]["ids"]
    labels = results[cfg.attacks[0]]["labels"]
    atomic_replace(out_dir / "scores.npz", lambda tmp: np.savez_compressed(
        open(tmp, "wb"), ids=np.array(ids), labels=labels, **{n: r["scores"] for n, r in results.items()}))
    atomic_replace(out_dir / "roc_loglog.png", lambda tmp: open(tmp, "wb").write(
        roc_plot({n: (r["scores"], r["labels"], records[n]["auc"]["value"]) for n, r in results.items()}, n1, n0)))
    atomic_write_json(out_dir / "audit.json", audit)
    return audit


def load_audit(run_dir: str | Path, control: bool = False) -> dict | None:
    path = Path(run_dir) / "audit" / ("control" if control else "") / "audit.json"
    return json.loads(path.read_text()) if path.is_file() else None
