"""Helpers of the adversarial suite: every hostile input ends in one line on stderr, the documented
exit code, nothing half-written, and bounded time and memory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from privdiff.cli import main

BAD_INPUT = 2  # PrivdiffError: the input is refused and the line says why
SECONDS = 60  # the bound on any refusal (they take well under a second to a few seconds)


def refused(argv: list[str], capsys, code: int = BAD_INPUT) -> str:
    """Runs the CLI in-process; asserts the exit code, a single stderr line and the time bound."""
    capsys.readouterr()
    began = time.perf_counter()
    assert main(argv) == code
    seconds = time.perf_counter() - began
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:" if code == BAD_INPUT else "internal error:"), err
    assert seconds < SECONDS, (argv, seconds)
    return err


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under `folder` with its size (to show a refusal wrote nothing)."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def run_isolated(argv: list[str], timeout: float = SECONDS) -> tuple[int, str, int]:
    """Runs `privdiff ARGV` in a fresh process; returns (exit code, stderr, peak resident bytes)."""
    script = ("import json, resource, sys\nfrom privdiff.cli import main\n"
              f"code = main({json.dumps(argv)})\n"
              "print(json.dumps([code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    code, peak = json.loads(done.stdout.strip().splitlines()[-1])
    return code, done.stderr.strip(), peak


__all__ = ["BAD_INPUT", "SECONDS", "refused", "run_isolated", "snapshot"]
