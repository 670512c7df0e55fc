"""The main job: the embedded default run, end to end, in a few minutes on 2 CPU cores."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from privdiff.audit.run import AuditConfig, load_audit, run_audit
from privdiff.config import RunConfig, RuntimeConfig, load_config
from privdiff.evaluation import EvalConfig, evaluate_run
from privdiff.metrics.estimate import format_estimate
from privdiff.report import write_report
from privdiff.runtime import resolve_runtime
from privdiff.training.early_stop import early_stop_like
from privdiff.training.run import run_training

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


# DP-LoRA beside the plain LoRA, on the same members: the DP spec's defaults (ε = 8,
# δ = min(1e-5, 0.1/N), B = min(64, N/4), C = 1e-3, 50 epochs, AdamW lr 1e-3, rank 8 with α = r on the
# attention projections). The plain recipe's 4x larger adapter and lr 5e-3 drown in DP noise (AdamW
# moves every coordinate by about lr per step whatever the signal). K = 2 instead of 4 halves the
# cost (K multiplies the UNet passes) and changes no guarantee.
DP_OVERRIDES = ["train.method=dp-lora", "dp.target_epsilon=8", "dp.noise_multiplicity=2",
                "train.learning_rate=0.001", "lora.rank=8", "lora.alpha=8",
                "lora.target_modules=[to_q, to_k, to_v, to_out.0]"]

# SMP-LoRA with the plain run's recipe (only the objective differs, smp-lora spec §3). The proxy
# learns with lr 1e-3 on 8 + 8 examples per step: at the reference's 1e-5 and 1 + 1 it would barely
# move in 1 000 steps at this scale (spec §4 names the knob). Probes every 20 epochs keep the demo short.
SMP_OVERRIDES = ["train.method=smp-lora", "smp.proxy_lr=0.001", "smp.proxy_batch_per_class=8",
                 "smp.probe_every=20"]

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
            # a run shorter than its logging interval (demo --steps 5) has no loss on record
            loss = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
            lines.append(f"  {name:<10} {path}  (final loss {loss}, {summary['steps']} steps)")
            smp = summary.get("smp")
            if smp:
                lines.append(f"         {smp['method']}: lambda {smp['lambda']}, beta {smp['beta']}, proxy lr "
                             f"{smp['proxy_lr']:g}; {'DIVERGED' if smp['diverged'] else 'no divergence'}; step cost "
                             f"{smp['cost_ratio_vs_lora']:.2f} x plain (co-trained proxy: diagnostic only)")
            match = summary.get("early_stopped")
            if match:
                lines.append(f"         plain LoRA stopped at step {match['step']} of {match['of_steps']}: held-out "
                             f"loss on aux non-members {match['loss']:.4f} vs {match['target_loss']:.4f} "
                             f"({Path(match['matched_to']).name})")
            privacy = summary.get("privacy") or {}
            if privacy.get("epsilon") is not None:
                lines.append(f"         guarantee: ({privacy['epsilon']:.3f}, {privacy['delta']:.3g})-DP per example "
                             f"({privacy['accountant'].upper()}; PLD {privacy['epsilon_pld']:.3f}), sigma {privacy['noise_multiplier']}, "
                             f"q {privacy['sample_rate']:.3g}, {privacy['steps']} steps, K {privacy['noise_multiplicity']}")
            for key in HEADLINE_METRICS:
                if key in summary["metrics"]:
                    m = summary["metrics"][key]
                    lines.append(f"         {key:<28} {format_estimate(m, '.4g')}")
            audit = load_audit(path)
            if audit:
                best = audit["attacks"][audit["best_attack"]]
                lines.append(f"         membership audit: best attack {audit['best_attack']}, AUC "
                             f"{format_estimate(best['auc'])}, TPR@5%FPR "
                             f"{best['tpr_at_fpr']['0.05']['value']:.3f} ({audit['n_members_test']} members / "
                             f"{audit['n_nonmembers_test']} non-members)")
            control = load_audit(path, control=True)
            if control:
                worst = max(abs(a["auc"]["value"] - 0.5) for a in control["attacks"].values())
                lines.append(f"         control (base model): largest |AUC - 0.5| {worst:.3f} "
                             f"(3 null sd = {3 * control['null_auc_sd']:.3f})")
        lines.append(f"report card: {self.report}")
        return "\n".join(lines)


def demo_config(out: Path, name: str, steps: int | None = None, extra: list[str] | None = None) -> RunConfig:
    """The demo recipe writing to out/name; `steps` shortens every run (tests and smoke runs)."""
    overrides = [f"output_dir={Path(out) / name}", *(extra or [])]
    if steps:
        overrides += [f"train.steps={steps}", "dp.epochs=null"]
    return load_config(DEMO_CONFIG, overrides)


def run_demo(out: Path, steps: int | None = None, show_progress: bool = True,
             runtime: RuntimeConfig = RuntimeConfig()) -> DemoResult:
    """Fine-tunes plain LoRA, DP-LoRA and SMP-LoRA on the same private digits, stops the plain LoRA
    early at SMP-LoRA's utility, evaluates and audits all four (and the base model as the control),
    and writes the report card."""
    began = time.perf_counter()
    resolved = resolve_runtime(runtime)  # checked before anything is written
    where = [f"runtime.device={runtime.device}", f"runtime.precision={runtime.precision}"]
    lora_dir = run_training(demo_config(out, "lora", steps, where), overwrite=True, show_progress=show_progress)
    paired = [f"membership.manifest={lora_dir / 'membership.json'}", *where]  # same members, results paired
    dp_dir = run_training(demo_config(out, "dp-lora", steps, DP_OVERRIDES + paired), overwrite=True,
                          show_progress=show_progress)
    smp_dir = run_training(demo_config(out, "smp-lora", steps, SMP_OVERRIDES + paired), overwrite=True,
                           show_progress=show_progress)
    early_dir = early_stop_like(lora_dir, smp_dir, Path(out) / "lora-early", overwrite=True, runtime=resolved)
    runs = {"lora": lora_dir, "dp-lora": dp_dir, "smp-lora": smp_dir, "lora-early": early_dir}
    for path in runs.values():
        evaluate_run(path, EvalConfig(**DEMO_EVAL, runtime=runtime), show_progress=show_progress)
        run_audit(path, AuditConfig(runtime=runtime), show_progress=show_progress)
    run_audit(lora_dir, AuditConfig(control=True, runtime=runtime), show_progress=show_progress)
    report = write_report(list(runs.values()), Path(out) / "report.html")
    return DemoResult(run_dirs=runs, report=report, wall_time_s=time.perf_counter() - began)
