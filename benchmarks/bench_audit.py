"""Membership-attack cost on this machine: queries per example and examples scored per second.

Fine-tunes a short LoRA run on the demo data (utility and leakage do not matter here), trains the
LiRA/RMIA shadows with the same short recipe, and audits with every registered attack (RMIA online
and offline and the shadow-free quantile attack included). Prints a table and writes
JSON (default: benchmarks/results/bench_audit.json). Shadow training time is reported separately:
a shadow costs one fine-tuning run of the target's recipe.

    python benchmarks/bench_audit.py            # 8 shadows
    python benchmarks/bench_audit.py --quick    # smoke run: 2 shadows, few steps
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from common import print_table, write_json

from privdiff.audit.attacks import ATTACKS
from privdiff.audit.run import AuditConfig, run_audit
from privdiff.config import load_config
from privdiff.demo import DEMO_CONFIG
from privdiff.runs.record import run_record
from privdiff.training.run import run_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (tiny sizes)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_audit.json")
    args = parser.parse_args()
    steps, shadows = (5, 2) if args.quick else (50, 8)
    attacks = list(ATTACKS)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(DEMO_CONFIG, [f"output_dir={tmp}/run", f"train.steps={steps}", "sample.num_images=1",
                                        "sample.num_inference_steps=1"])
        run_dir = run_training(cfg, show_progress=False)
        began = time.perf_counter()
        audit = run_audit(run_dir, AuditConfig(attacks=attacks, shadows=shadows, bootstrap=100),
                          show_progress=not args.quick)
        total = time.perf_counter() - began
    per_attack = {name: {k: r[k] for k in ("queries_per_example", "examples_per_second", "fit_seconds", "access")}
                  for name, r in audit["attacks"].items()}
    out = {"benchmark": "audit", "quick": args.quick, "shadows": shadows, "shadow_steps": steps,
           "n_scored": audit["n_members_test"] + audit["n_nonmembers_test"],
           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
           **run_record(), "attacks": per_attack, "total_s_including_shadow_training": total}
    rows = [("attack", "queries/example", "examples/s", "fit s", "access")]
    rows += [(n, str(r["queries_per_example"]), f"{r['examples_per_second']:.1f}", f"{r['fit_seconds']:.1f}",
              r["access"]) for n, r in per_attack.items()]
    rows.append((f"total incl. {shadows} shadows x {steps} steps", "", "", f"{total:.0f}", ""))
    print_table(rows)
    write_json(args.out, out)


if __name__ == "__main__":
    main()
