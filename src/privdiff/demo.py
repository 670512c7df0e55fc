"""The main job: the embedded default run, end to end, in about 2 minutes on 2 CPU cores.

`run_demo` fine-tunes a plain LoRA and a DP-LoRA on the same private digits, evaluates and audits both
(and the base model as the control) and writes the report card. `full=True` adds the SMP-LoRA defence
and the plain LoRA stopped early at its utility (about 3 minutes more). Each phase's wall time and the
claims the demo makes are written to demo.json beside the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from privdiff.audit.run import AuditConfig, load_audit, run_audit
from privdiff.config import RunConfig, RuntimeConfig, load_config
from privdiff.evaluation import EvalConfig, evaluate_run
from privdiff.metrics.estimate import format_estimate
from privdiff.report import write_report
from privdiff.report.verdict import (
    CAUGHT_NULL_SD,
    CHANCE_NULL_SD,
    is_at_chance,
    is_caught,
    largest_auc_gap,
)
from privdiff.runs.files import atomic_write_json
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
CAUGHT_MIN_AUC = 0.8  # the demo's claim for the over-fitted plain LoRA, beside `is_caught`


@dataclass
class DemoResult:
    run_dirs: dict[str, Path]
    report: Path
    wall_time_s: float
    phases_s: dict[str, float] = field(default_factory=dict)

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
                lines.append(f"         control (base model): largest |AUC - 0.5| {largest_auc_gap(control):.3f} "
                             f"({CHANCE_NULL_SD} null sd = {CHANCE_NULL_SD * control['null_auc_sd']:.3f})")
        if self.phases_s:
            lines.append("phases: " + ", ".join(f"{name} {s:.0f} s" for name, s in self.phases_s.items()))
        lines.append(f"report card: {self.report}")
        return "\n".join(lines)


def demo_claims(run_dirs: dict[str, Path]) -> dict:
    """What the demo claims, each with the figures it rests on and whether it holds: the plain LoRA
    is caught (best attack, chosen on aux, AUC >= 0.8 with its lower interval end above
    0.5 + 2 null sd), the DP-LoRA is at chance (every attack within 3 null sd) with its ε, and the
    control (base model, no adapter) is at chance."""
    claims = {}
    plain = load_audit(run_dirs["lora"])
    if plain:
        best = plain["attacks"][plain["best_attack"]]["auc"]
        floor = 0.5 + CAUGHT_NULL_SD * plain["null_auc_sd"]
        claims["lora caught"] = {"attack": plain["best_attack"], "auc": best, "lower_end_above": floor,
                                 "holds": best["value"] >= CAUGHT_MIN_AUC and is_caught(plain)}
    dp_audit = load_audit(run_dirs["dp-lora"])
    if dp_audit:
        privacy = json.loads((run_dirs["dp-lora"] / "summary.json").read_text())["privacy"]
        band = CHANCE_NULL_SD * dp_audit["null_auc_sd"]
        claims["dp-lora at chance"] = {
            "epsilon": privacy["epsilon"], "delta": privacy["delta"], "best_attack": dp_audit["best_attack"],
            "auc": dp_audit["attacks"][dp_audit["best_attack"]]["auc"], "largest_auc_gap": largest_auc_gap(dp_audit),
            "band": band, "holds": is_at_chance(dp_audit)}
    control = load_audit(run_dirs["lora"], control=True)
    if control:
        band = CHANCE_NULL_SD * control["null_auc_sd"]
        claims["control at chance"] = {"largest_auc_gap": largest_auc_gap(control), "band": band,
                                       "holds": is_at_chance(control)}
    return claims


def demo_config(out: Path, name: str, steps: int | None = None, extra: list[str] | None = None) -> RunConfig:
    """The demo recipe writing to out/name; `steps` shortens every run (tests and smoke runs)."""
    overrides = [f"output_dir={Path(out) / name}", *(extra or [])]
    if steps:
        overrides += [f"train.steps={steps}", "dp.epochs=null"]
    return load_config(DEMO_CONFIG, overrides)


@contextmanager
def _phase(phases: dict[str, float], cpu: dict[str, float], name: str) -> Iterator[None]:
    """Records the phase's wall time and its CPU time (all threads). Neither is a clean figure on a
    loaded machine: with the load at 4-5x the cores, both grew about 7x here."""
    began, began_cpu = time.perf_counter(), time.process_time()
    yield
    phases[name] = round(time.perf_counter() - began, 2)
    cpu[name] = round(time.process_time() - began_cpu, 2)


def run_demo(out: Path, steps: int | None = None, show_progress: bool = True,
             runtime: RuntimeConfig = RuntimeConfig(), full: bool = False) -> DemoResult:
    """Fine-tunes plain LoRA and DP-LoRA on the same private digits, evaluates and audits both (and
    the base model as the control), and writes the report card and demo.json (phase times, claims).
    `full` adds SMP-LoRA and the plain LoRA stopped early at SMP-LoRA's utility, both evaluated and
    audited."""
    began = time.perf_counter()
    phases: dict[str, float] = {}
    cpu: dict[str, float] = {}
    resolved = resolve_runtime(runtime)  # checked before anything is written
    where = [f"runtime.device={runtime.device}", f"runtime.precision={runtime.precision}"]
    with _phase(phases, cpu, "train lora"):
        lora_dir = run_training(demo_config(out, "lora", steps, where), overwrite=True, show_progress=show_progress)
    paired = [f"membership.manifest={lora_dir / 'membership.json'}", *where]  # same members, results paired
    with _phase(phases, cpu, "train dp-lora"):
        dp_dir = run_training(demo_config(out, "dp-lora", steps, DP_OVERRIDES + paired), overwrite=True,
                              show_progress=show_progress)
    runs = {"lora": lora_dir, "dp-lora": dp_dir}
    if full:
        with _phase(phases, cpu, "train smp-lora"):
            runs["smp-lora"] = run_training(demo_config(out, "smp-lora", steps, SMP_OVERRIDES + paired),
                                            overwrite=True, show_progress=show_progress)
        with _phase(phases, cpu, "early-stop lora"):
            runs["lora-early"] = early_stop_like(lora_dir, runs["smp-lora"], Path(out) / "lora-early",
                                                 overwrite=True, runtime=resolved)
    for name, path in runs.items():
        with _phase(phases, cpu, f"evaluate {name}"):
            evaluate_run(path, EvalConfig(**DEMO_EVAL, runtime=runtime), show_progress=show_progress)
        with _phase(phases, cpu, f"audit {name}"):
            run_audit(path, AuditConfig(runtime=runtime), show_progress=show_progress)
    with _phase(phases, cpu, "audit control"):
        run_audit(lora_dir, AuditConfig(control=True, runtime=runtime), show_progress=show_progress)
    with _phase(phases, cpu, "report"):
        report = write_report(list(runs.values()), Path(out) / "report.html")
    wall = time.perf_counter() - began
    atomic_write_json(Path(out) / "demo.json", {"full": full, "steps": steps, "wall_time_s": round(wall, 2),
                                                "phases_s": phases, "phases_cpu_s": cpu, "claims": demo_claims(runs),
                                                "runs": {name: str(path) for name, path in runs.items()}})
    return DemoResult(run_dirs=runs, report=report, wall_time_s=wall, phases_s=phases)
