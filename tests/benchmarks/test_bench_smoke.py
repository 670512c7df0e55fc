import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_finetune_quick_writes_json(tmp_path: Path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_finetune.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["finetune"]["steps_per_s"] > 0 and result["finetune"]["peak_rss_mib"] > 0
    assert result["demo"]["demo_wall_time_s"] > 0
    assert "steps/s" in proc.stdout
