"""LiRA shadow farms under torchrun (issue 32): every process trains its share of the shadows, the
results do not depend on the number of processes, and a stopped farm keeps its finished shadows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import without_keys

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
# Timings, the run's own path and the process's thread count differ between any two audits.
UNSTABLE = {"wall_time_s", "fit_seconds", "examples_per_second", "run", "torch_threads"}


def audit_command(run: Path, nproc: int) -> list[str]:
    args = ["audit", str(run), "--attacks", "loss,lira-offline", "--shadows", "2", "--bootstrap", "20", "--quiet"]
    if nproc == 1:
        return [sys.executable, "-m", "privdiff", *args]
    return [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "privdiff", *args, "--distributed"]


def audit(run: Path, nproc: int) -> dict:
    done = subprocess.run(audit_command(run, nproc), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run / "audit" / "audit.json").read_text())


def stable(value):
    return without_keys(value, UNSTABLE)


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this python")
def test_one_and_two_processes_give_the_same_audit_and_a_stopped_farm_keeps_its_finished_shadows(
        finished_tiny_run: Path, tmp_path: Path):
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    for copy in (one, two):
        shutil.copytree(finished_tiny_run, copy)

    assert stable(audit(two, 2)) == stable(audit(one, 1))

    # A farm stopped while training shadow 1: its folder has no summary.json (written last).
    shadows = two / "audit" / "shadows"
    finished = shadows / "shadow-00" / "pytorch_lora_weights.safetensors"
    finished_mtime = finished.stat().st_mtime_ns
    (shadows / "shadow-01" / "summary.json").unlink()
    again = audit(two, 2)
    assert finished.stat().st_mtime_ns == finished_mtime  # not retrained
    assert (shadows / "shadow-01" / "summary.json").exists()
    assert stable(again) == stable(json.loads((one / "audit" / "audit.json").read_text()))
