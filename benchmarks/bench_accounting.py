"""Accounting within its caps: time and peak memory of one ε (`privdiff epsilon`'s computation) per
cell of issue 26's grid, each cell in a fresh process so that its peak is its own, with the
reported accountant and, for comparison, what a fixed 1e-4 PLD grid costs on the same cell.

Prints a table and writes JSON (default: benchmarks/results/bench_accounting.json).

    python benchmarks/bench_accounting.py            # 60 cells, about 4 minutes on 2 cores
    python benchmarks/bench_accounting.py --quick    # 4 cells
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import print_table, write_json

from privdiff.dp.accounting import MEMORY_CAP_BYTES, PRV_MAX_POINTS, compare_accountants, pld_epsilon
from privdiff.runs.record import run_record

DELTA = 1e-5
GRID = list(itertools.product((0.001, 0.01, 0.05, 0.25), (0.3, 0.6, 1.0, 2.0, 5.0), (10, 1000, 10000)))
QUICK = [(0.25, 0.3, 10000), (0.01, 1.0, 10000), (0.05, 1.0, 1000), (0.001, 0.3, 1000)]


def one_cell(cell: tuple[float, float, int]) -> dict:
    q, sigma, steps = cell
    began = time.perf_counter()
    figures = compare_accountants([(sigma, q, steps)], DELTA)
    return {"q": q, "sigma": sigma, "steps": steps, **figures["reported"],
            "seconds": round(time.perf_counter() - began, 3),
            "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def fixed_grid_pld(cell: tuple[float, float, int]) -> dict:
    """dp-accounting's PLD at the fixed 1e-4 grid: what the cross-check cost before the caps."""
    q, sigma, steps = cell
    began = time.perf_counter()
    value = pld_epsilon([(sigma, q, steps)], DELTA, discretization=1e-4)
    return {"epsilon": value, "seconds": round(time.perf_counter() - began, 3),
            "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_accounting.json")
    args = parser.parse_args()
    cells = QUICK if args.quick else GRID
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=spawn, max_tasks_per_child=1) as pool:
        rows = list(pool.map(one_cell, cells))
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn, max_tasks_per_child=1) as pool:
        worst = max(cells, key=lambda c: c[2] * c[0] / c[1])  # the largest ε: where a fixed grid hurts most
        fixed = {"cell": list(worst), **pool.submit(fixed_grid_pld, worst).result()}
    table = [("q", "σ", "steps", "ε", "by", "s", "peak MiB")]
    table += [(f"{r['q']:g}", f"{r['sigma']:g}", str(r["steps"]), f"{r['epsilon']:.5g}", r["accountant"],
               f"{r['seconds']:.2f}", f"{r['peak_mib']:.0f}") for r in rows]
    print_table(table)
    summary = {"cells": len(rows), "max_seconds": max(r["seconds"] for r in rows),
               "max_peak_mib": max(r["peak_mib"] for r in rows),
               "by_accountant": {a: sum(r["accountant"] == a for r in rows) for a in ("prv", "pld", "rdp")},
               "memory_cap_mib": MEMORY_CAP_BYTES / 2**20, "prv_max_points": PRV_MAX_POINTS}
    print(f"\n{summary['cells']} cells: at most {summary['max_seconds']:.1f} s and {summary['max_peak_mib']:.0f} MiB "
          f"(cap {summary['memory_cap_mib']:.0f} MiB); reported by {summary['by_accountant']}")
    print(f"fixed 1e-4 PLD grid on q {worst[0]}, σ {worst[1]}, {worst[2]} steps: {fixed['seconds']:.1f} s, "
          f"{fixed['peak_mib']:.0f} MiB (ε {fixed['epsilon']:.6g})")
    write_json(args.out, {"delta": DELTA, "summary": summary, "cells": rows, "fixed_grid_pld": fixed,
                          "record": run_record()})


if __name__ == "__main__":
    main()
