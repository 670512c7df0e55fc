"""MP-LoRA and SMP-LoRA: step time against plain LoRA (side by side), and MP-LoRA's instability.

1. Step time: plain LoRA, SMP-LoRA and MP-LoRA with the demo's recipe on one fixed batch of 16,
   interleaved step by step so that machine noise hits every method alike.
2. Stability: MP-LoRA trained like the demo's SMP-LoRA (same members, recipe, proxy settings),
   then evaluated and audited; printed beside plain LoRA and SMP-LoRA (the demo's runs, reused). The
   per-epoch CE_m trajectory and the objective J say whether the min-max game diverges.

Prints tables and writes JSON (default: benchmarks/results/bench_smp.json).

    python benchmarks/bench_smp.py --demo-dir runs/demo   # after `privdiff demo --full` (reuses its runs)
    python benchmarks/bench_smp.py --quick                # smoke run: few steps, tiny evaluation
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import print_table, write_json

from privdiff.audit.run import AuditConfig, load_audit, run_audit
from privdiff.config import load_config
from privdiff.demo import DEMO_CONFIG, SMP_OVERRIDES
from privdiff.diffusion.task import build_task
from privdiff.evaluation import EvalConfig, evaluate_run
from privdiff.metrics.estimate import format_estimate
from privdiff.models.load import load_pipeline
from privdiff.runs.record import run_record
from privdiff.seeding import generator
from privdiff.training.loop import make_batch
from privdiff.training.methods import get_method
from privdiff.training.run import prepare_inputs, run_training

METHOD_OVERRIDES = {"lora": [], "smp-lora": SMP_OVERRIDES,
                    "mp-lora": [*SMP_OVERRIDES, "train.method=mp-lora"]}


def prepared(name: str, batch: int):
    cfg = load_config(DEMO_CONFIG, [*METHOD_OVERRIDES[name], f"train.batch_size={batch}"])
    method = get_method(cfg.train.method)(cfg)
    inputs = prepare_inputs(cfg)
    task = build_task(load_pipeline(cfg.model.pretrained), inputs.members, inputs.splits(method.extra_roles))
    torch.manual_seed(0)
    method.prepare(task)
    return method, task


def time_side_by_side(batch: int, steps: int, warmup: int) -> dict:
    methods = {name: prepared(name, batch) for name in METHOD_OVERRIDES}
    rows = torch.arange(batch)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for step in range(warmup + steps):
        for name, (method, task) in methods.items():
            rng = generator(0, "bench", step)
            batch_ = make_batch(task, rows, 0.0, rng)
            began = time.perf_counter()
            method.step(task, batch_, rng)
            if step >= warmup:
                times[name].append(time.perf_counter() - began)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    return {"batch_size": batch, "timed_steps": steps, "median_step_s": median,
            "ratio_to_lora": {name: median[name] / median["lora"] for name in median}}


def epoch_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "smp_log.jsonl"
    if not path.is_file():
        return []
    return [row for row in map(json.loads, path.read_text().splitlines()) if "epoch" in row]


def describe(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    audit = load_audit(run_dir)
    best = audit["attacks"][audit["best_attack"]] if audit else None
    epochs = epoch_rows(run_dir)
    ce = [row["ce_m"] for row in epochs if row.get("ce_m") is not None]
    objective = [row["objective"] for row in epochs if row.get("objective") is not None]
    return {
        "run": str(run_dir), "method": summary["method"], "steps": summary["steps"],
        "smp": summary.get("smp"),
        "ce_m_by_epoch": {"first": ce[0] if ce else None, "middle": ce[len(ce) // 2] if ce else None,
                          "last": ce[-1] if ce else None, "max": max(ce) if ce else None},
        "objective_by_epoch": {"first": objective[0] if objective else None,
                               "min": min(objective) if objective else None,
                               "last": objective[-1] if objective else None},
        "metrics": {k: {"value": v["value"], "ci": v["ci"]} for k, v in summary["metrics"].items()
                    if k in ("kid/members", "fid/members", "heldout_loss/member_test", "heldout_loss/nonmember_test")},
        "best_attack": None if best is None else {"name": audit["best_attack"], "auc": best["auc"],
                                                  "tpr_at_5pct_fpr": best["tpr_at_fpr"]["0.05"]},
    }


def trained(folder: Path, name: str, method: list[str], steps: int | None, evaluation: EvalConfig,
            attacks: list[str], manifest: Path | None, retrain: bool = False) -> tuple[Path, float | None]:
    """The demo recipe with `method` overrides, trained into folder/name, evaluated and audited (kept when done)."""
    run_dir = folder / name
    if (run_dir / "audit" / "audit.json").is_file() and not retrain:
        return run_dir, None
    quick = ["sample.num_images=1", "sample.num_inference_steps=1"] if steps else []
    overrides = [f"output_dir={run_dir}", *method, *([f"train.steps={steps}"] if steps else []), *quick,
                 *([f"membership.manifest={manifest}"] if manifest else [])]
    began = time.perf_counter()
    run_training(load_config(DEMO_CONFIG, overrides), overwrite=True, show_progress=False)
    train_s = time.perf_counter() - began
    evaluate_run(run_dir, evaluation, show_progress=False)
    run_audit(run_dir, AuditConfig(attacks=attacks), show_progress=False)
    return run_dir, train_s


def stability(folder: Path, steps: int | None, evaluation: EvalConfig, attacks: list[str],
              mp_lambdas: list[float]) -> dict:
    """MP-LoRA at each λ beside plain LoRA and SMP-LoRA on the same members (the demo's runs when present)."""
    lora_dir, _ = trained(folder, "lora", [], steps, evaluation, attacks, None)
    manifest = lora_dir / "membership.json"
    result = {"lora": describe(lora_dir)}
    settings = {"smp-lora": (METHOD_OVERRIDES["smp-lora"], False)}
    for lam in mp_lambdas:
        settings["mp-lora" if lam == 1 else f"mp-lora-lambda{lam:g}"] = ([*METHOD_OVERRIDES["mp-lora"], f"smp.lam={lam}"], True)
    for name, (method, retrain) in settings.items():
        run_dir, train_s = trained(folder, name, method, steps, evaluation, attacks, manifest, retrain=retrain)
        result[name] = {**describe(run_dir), "train_s": train_s}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (tiny sizes)")
    parser.add_argument("--demo-dir", type=Path, default=None,
                        help="a finished `privdiff demo --full` folder: its lora and smp-lora runs are reused and "
                             "mp-lora is written beside them (default: train all three in a temporary folder)")
    parser.add_argument("--mp-lambda", type=float, nargs="+", default=[1.0, 10.0],
                        help="MP-LoRA weights λ to train (default: 1, the reference's, and 10)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_smp.json")
    args = parser.parse_args()
    steps, warmup = (2, 1) if args.quick else (30, 3)
    timing = time_side_by_side(16, steps, warmup)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.demo_dir or Path(tmp)
        evaluation = EvalConfig(num_samples=20, num_inference_steps=5, bootstrap=20, kid_subsets=5) if args.quick \
            else EvalConfig(num_samples=256)
        runs = stability(folder, 4 if args.quick else None, evaluation,
                         ["loss"] if args.quick else list(AuditConfig().attacks), [1.0] if args.quick else args.mp_lambda)
    result = {"benchmark": "smp", "quick": args.quick, "torch_threads": torch.get_num_threads(), **run_record(),
              "timing": timing, "stability": runs}

    print(f"\nstep time, batch {timing['batch_size']}, demo recipe (median of {timing['timed_steps']}, interleaved)")
    print_table([("method", "step (s)", "/ lora")] + [
        (name, f"{timing['median_step_s'][name]:.3f}", f"{timing['ratio_to_lora'][name]:.2f}")
        for name in timing["median_step_s"]])
    print("\nstability and leakage on the demo's members (per-epoch means; attacks retrained after training)")
    rows = [("run", "CE_m first", "CE_m last", "CE_m max", "J min", "diverged", "KID", "held-out loss (test members)",
             "best attack AUC")]
    for name, r in runs.items():
        ce, obj, best = r["ce_m_by_epoch"], r["objective_by_epoch"], r["best_attack"]
        with_ci = [f"{m['value']:.3g} [{m['ci'][0]:.3g}, {m['ci'][1]:.3g}]" if m else "-"
                   for m in (r["metrics"].get("kid/members"), r["metrics"].get("heldout_loss/member_test"))]
        rows.append((name, *(f"{v:.3g}" if v is not None else "-" for v in (ce["first"], ce["last"], ce["max"], obj["min"])),
                     str(r["smp"]["diverged"]) if r["smp"] else "-", *with_ci,
                     f"{best['name']} {format_estimate(best['auc'])}" if best else "-"))
    print_table(rows)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
