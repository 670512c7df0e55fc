"""Shared output of the benchmark scripts: an aligned table on stdout and a JSON file with a `meta`
record (commit, date, hardware), from which benchmarks/render_docs.py writes the docs' tables."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Rows of strings; the first column is left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        print("  ".join(cells).rstrip())


def _git_commit() -> str:
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measurement_meta() -> dict:
    """Where and when a result was measured: the stamp render_docs.py prints under every table."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    hardware = f"{_cpu_model()}, {cores} cores" + (f", {gpu}" if gpu else "")
    return {"commit": _git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "hardware": hardware, "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": cores,
            "gpu": gpu, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15_min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def write_json(path: Path, result: dict) -> None:
    result = {"meta": measurement_meta(), **result}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
