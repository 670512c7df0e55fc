"""The main job: the embedded default run, end to end, in a few minutes on 2 CPU cores."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from privdiff.audit.run import AuditConfig, load_audit, run_audit
from privdiff.config import RunConfig, load_config
from privdiff.metrics.evaluate import EvalConfig, evaluate_run
from privdiff.report import write_report
from privdiff.training.run import run_training

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


# Quick mode of the evaluation spec (256 samples instead of 1 000) keeps the demo in minutes.
DEMO_EVAL = {"num_samples": 256}
HEADLINE_METRICS = ("kid/members", "fid/members", "accuracy/digit", "heldout_loss/member_test",
                    "heldout_loss/nonmember_test")


@dataclass
class DemoResult:
    run_dirs: dict[str, Path]
    report: Path
    wall_time_s: float

    def describe(self) -> str:
        lines = [f"demo finished in {self.wall_time_s:.0f} s"]
        for name, path in self.run_dirs.items():
            summary = json.loads((path / "summary.json").read_text())
            lines.append(f"  {name:<6} {path}  (final loss {summary['final_loss']:.4f}, "
                         f"{summary['steps']} steps)")
            for key in HEADLINE_METRICS:
                if key in summary["metrics"]:
                    m = summary["metrics"][key]
                    lines.append(f"         {key:<28} {m['value']:.4g}  [{m['ci'][0]:.4g}, {m['ci'][1]:.4g}]")
            audit = load_audit(path)
            if audit:
                best = audit["attacks"][audit["best_attack"]]
                lines.append(f"         membership audit: best attack {audit['best_attack']}, AUC {best['auc']:.3f} "
                             f"[{best['auc_ci'][0]:.3f}, {best['auc_ci'][1]:.3f}], TPR@5%FPR "
                             f"{best['tpr_at_fpr']['0.05']:.3f} ({audit['n_members_test']} members / "
                             f"{audit['n_nonmembers_test']} non-members)")
            control = load_audit(path, control=True)
            if control:
                worst = max(abs(a["auc"] - 0.5) for a in control["attacks"].values())
                lines.append(f"         control (base model): largest |AUC - 0.5| {worst:.3f} "
                             f"(3 null sd = {3 * control['null_auc_sd']:.3f})")
        lines.append(f"report card: {self.report}")
        return "\n".join(lines)


def demo_config(out: Path, name: str, steps: int | None = None) -> RunConfig:
    overrides = [f"output_dir={Path(out) / name}"] + ([f"train.steps={steps}"] if steps else [])
    return load_config(DEMO_CONFIG, overrides)


def run_demo(out: Path, steps: int | None = None, show_progress: bool = True) -> DemoResult:
    """Fine-tunes plain LoRA on the private digits, evaluates and audits it (and the base model as
    the control), and writes the report card."""
    began = time.perf_counter()
    lora_dir = run_training(demo_config(out, "lora", steps), overwrite=True, show_progress=show_progress)
    runs = {"lora": lora_dir}
    for path in runs.values():
        evaluate_run(path, EvalConfig(**DEMO_EVAL), show_progress=show_progress)
        run_audit(path, AuditConfig(), show_progress=show_progress)
    run_audit(lora_dir, AuditConfig(control=True), show_progress=show_progress)
    report = write_report(list(runs.values()), Path(out) / "report.html")
    return DemoResult(run_dirs=runs, report=report, wall_time_s=time.perf_counter() - began)
