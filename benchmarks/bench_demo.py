"""`privdiff demo` on this machine: wall time per phase and the claims the demo makes.

Runs the demo as a user does (`python -m privdiff.cli demo`, start-up included), `--repeats` times,
reads the phase times and claims it writes to demo.json, and prints a table. Writes JSON (default:
benchmarks/results/bench_demo.json; with --full: bench_demo_full.json).

    python benchmarks/bench_demo.py                 # the demo, once
    python benchmarks/bench_demo.py --repeats 2     # twice: the spread on a shared machine
    python benchmarks/bench_demo.py --full          # demo --full (SMP-LoRA, early stopping)
    python benchmarks/bench_demo.py --quick         # smoke run: every run 5 steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import print_table, write_json

from privdiff.runs.record import run_record

BUDGET_S = 240  # issue 30: the demo in at most 4 minutes on 2 cores


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def children_cpu() -> float:
    """User + system CPU seconds of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_demo(full: bool, steps: int | None) -> dict:
    """One `privdiff demo` in a fresh process: its wall time, phases, claims and peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "privdiff.cli", "demo", "--out", tmp, "--quiet"]
        cmd += ["--full"] if full else []
        cmd += ["--steps", str(steps)] if steps else []
        load_before, cpu_before = load_average(), children_cpu()
        began = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - began
        record = json.loads((Path(tmp) / "demo.json").read_text())
    phases = record["phases_s"]
    return {"wall_time_s": round(wall, 2), "in_process_s": record["wall_time_s"],
            "startup_s": round(wall - record["wall_time_s"], 2), "phases_s": phases,
            "phases_cpu_s": record["phases_cpu_s"], "children_cpu_s": round(children_cpu() - cpu_before, 2),
            "claims": record["claims"], "load_average_before": load_before, "load_average_after": load_average()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="time `privdiff demo --full`")
    parser.add_argument("--quick", action="store_true", help="smoke run (every run 5 steps)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(__file__).parent / "results" / f"bench_demo{'_full' if args.full else ''}.json"
    runs = [time_demo(args.full, 5 if args.quick else None) for _ in range(args.repeats)]
    walls = sorted(r["wall_time_s"] for r in runs)
    result = {"benchmark": "demo", "command": "privdiff demo" + (" --full" if args.full else ""),
              "quick": args.quick, "cpu_count": os.cpu_count(), "machine": platform.machine(), **run_record(),
              "budget_s": None if args.full else BUDGET_S, "runs": runs, "median_wall_time_s": walls[len(walls) // 2],
              "max_wall_time_s": walls[-1], "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
              "claims_hold": all(c["holds"] for r in runs for c in r["claims"].values())}
    rows = [("phase", *(f"run {i + 1}: wall / CPU (s)" for i in range(len(runs))))]
    rows += [(name, *(f"{r['phases_s'][name]:.1f} / {r['phases_cpu_s'][name]:.1f}" for r in runs))
             for name in runs[0]["phases_s"]]
    rows += [("start-up (imports, CLI)", *(f"{r['startup_s']:.1f}" for r in runs)),
             ("total wall time / CPU", *(f"{r['wall_time_s']:.1f} / {r['children_cpu_s']:.1f}" for r in runs)),
             ("load average before", *(str(r["load_average_before"][0]) for r in runs))]
    print_table(rows)
    for name, claim in runs[-1]["claims"].items():
        print(f"{name}: {'holds' if claim['holds'] else 'DOES NOT HOLD'}")
    write_json(out, result)


if __name__ == "__main__":
    main()
