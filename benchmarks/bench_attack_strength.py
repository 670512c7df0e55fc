"""Attack strength on the demo's plain LoRA: RMIA with 1-8 references against LiRA with 8 shadows,
and the shadow-free quantile attack against the loss attack (issue 31's acceptance).

Trains the demo's plain LoRA (the embedded recipe, 1 000 steps) and N shadows with the same recipe
(complementary-pair masks, so the first 2, 4, ... shadows are themselves balanced), then fits every
attack on the aux split and compares them on the test split with paired stratified bootstraps (same
examples, same resamples). The base model with no adapter is the control (all at chance).

    python benchmarks/bench_attack_strength.py --work /tmp/strength       # the measurement
    python benchmarks/bench_attack_strength.py --quick --work /tmp/s      # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from common import print_table, write_json

from privdiff.audit.attacks import ATTACKS
from privdiff.audit.roc import auc, paired_auc_difference, tpr_at
from privdiff.audit.run import AuditConfig, audit_target, evaluate_attack
from privdiff.audit.shadows import train_shadows
from privdiff.config import load_config
from privdiff.demo import DEMO_CONFIG
from privdiff.runs.folder import open_run
from privdiff.runs.record import run_record
from privdiff.training.run import run_training


def variants(num_shadows: int) -> dict[str, tuple[str, int | None]]:
    """label -> (registered attack, references)."""
    out = {"loss": ("loss", None), "quantile": ("quantile", None)}
    if num_shadows == 0:  # the shadow-free comparison only
        return out
    out |= {f"lira-online-{num_shadows}": ("lira-online", None), f"lira-offline-{num_shadows}": ("lira-offline", None)}
    out |= {f"rmia-{n}": ("rmia", n) for n in (2, 4, 8) if n <= num_shadows}
    out |= {f"rmia-offline-{n}": ("rmia-offline", n) for n in (1,) if 2 * n <= num_shadows}
    return out


def evaluate(label_attacks: dict, target, cfg: AuditConfig, shadows, keep: Path) -> dict:
    results, fitted_signals = {}, None
    for label, (name, references) in label_attacks.items():
        attack = ATTACKS[name](cfg.audit_seed)
        if references is not None:
            attack.references = references
        if hasattr(attack, "signals"):  # the RMIA variants share one fit of their statistics' timesteps
            if fitted_signals is not None:
                attack.signals, attack.refit_signals = fitted_signals, False
            fitted_signals = attack.signals
        results[label] = evaluate_attack(attack, target.model, target.data, cfg, shadows, target.base)
        r = results[label]["record"]
        keep.mkdir(parents=True, exist_ok=True)  # each attack's scores kept as soon as they exist
        np.savez(keep / f"{label}.npz", scores=results[label]["scores"], labels=results[label]["labels"])
        (keep / f"{label}.json").write_text(json.dumps(r))
        print(f"  {label:<16} AUC {r['auc']['value']:.3f} TPR@5% {r['tpr_at_fpr']['0.05']['value']:.3f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the run and its shadows (reused)")
    parser.add_argument("--shadows", type=int, default=8, help="0: only the shadow-free quantile vs loss comparison")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 steps, 4 shadows, 50 resamples")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_attack_strength.json")
    args = parser.parse_args()
    shadows_n, steps, resamples = (4, 20, 50) if args.quick else (args.shadows, None, 1000)
    began = time.perf_counter()
    overrides = [f"output_dir={args.work / 'lora'}"] + ([f"train.steps={steps}", "train.snapshots=0"] if steps else [])
    if not (args.work / "lora" / "summary.json").exists():
        run_training(load_config(DEMO_CONFIG, overrides), overwrite=True, show_progress=False)
    run = open_run(args.work / "lora")
    trained = time.perf_counter()
    shadows = train_shadows(run, shadows_n, 0, run.path / "audit" / "shadows", show_progress=False) if shadows_n else None
    shadow_s = time.perf_counter() - trained
    cfg = AuditConfig(attacks=["loss", "quantile"], bootstrap=resamples).validate()
    target = audit_target(run, cfg)
    print(f"target ({len(target.data['member_test'])} + {len(target.data['nonmember_test'])} test examples):")
    results = evaluate(variants(shadows_n), target, cfg, shadows, args.work / "scores" / "target")
    control_cfg = AuditConfig(attacks=["quantile"], bootstrap=resamples, control=True).validate()
    control_target = audit_target(run, control_cfg)
    print("control (base model, no adapter):")
    control = evaluate({k: v for k, v in variants(shadows_n).items()
                        if k in ("quantile", "rmia-2")},
                       control_target, control_cfg, shadows, args.work / "scores" / "control")

    labels = results["loss"]["labels"]
    lira = f"lira-online-{shadows_n}"
    pairs = {"quantile - loss": ("quantile", "loss")}
    if shadows_n:
        pairs |= {"rmia-2 - " + lira: ("rmia-2", lira),
                  f"rmia-2 - lira-offline-{shadows_n}": ("rmia-2", f"lira-offline-{shadows_n}")}
    paired = {}
    for key, (a, b) in pairs.items():
        sa, sb = results[a]["scores"], results[b]["scores"]
        paired[key] = {"auc": paired_auc_difference(sa, sb, labels, resamples=resamples),
                       "tpr@0.05": paired_auc_difference(sa, sb, labels, resamples=resamples, metric=tpr_at(0.05)),
                       "tpr@0.01": paired_auc_difference(sa, sb, labels, resamples=resamples, metric=tpr_at(0.01))}
    out = {"benchmark": "attack_strength", "quick": args.quick, "shadows": shadows_n, "resamples": resamples,
           "n_members_test": len(target.data["member_test"]), "n_nonmembers_test": len(target.data["nonmember_test"]),
           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), **run_record(),
           "shadow_training_s": shadow_s, "total_s": time.perf_counter() - began,
           "target": {k: r["record"] for k, r in results.items()},
           "control": {k: {"auc": r["record"]["auc"], "tpr@0.05": r["record"]["tpr_at_fpr"]["0.05"],
                           "control_auc_check": abs(auc(r["scores"], r["labels"]) - 0.5)} for k, r in control.items()},
           "paired": paired}
    rows = [("attack", "AUC [95 % CI]", "TPR@5%", "TPR@1% (unresolved)", "queries/ex", "ex/s", "fit s", "control AUC")]
    for k, r in results.items():
        rec = r["record"]
        rows.append((k, f"{rec['auc']['value']:.3f} [{rec['auc']['ci'][0]:.3f}, {rec['auc']['ci'][1]:.3f}]",
                     f"{rec['tpr_at_fpr']['0.05']['value']:.3f}", f"{rec['tpr_at_fpr']['0.01']['value']:.3f}",
                     str(rec["queries_per_example"]), f"{rec['examples_per_second']:.1f}", f"{rec['fit_seconds']:.1f}",
                     f"{control[k]['record']['auc']['value']:.3f}" if k in control else ""))
    print_table(rows)
    for key, d in paired.items():
        print(f"{key}: " + "; ".join(f"{m} {v['value']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]" for m, v in d.items()))
    write_json(args.out, out)


if __name__ == "__main__":
    main()
