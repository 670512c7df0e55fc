"""The report card: self-contained HTML, report.json with the same numbers, renders in Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privdiff.errors import ConfigError
from privdiff.evaluation import EvalConfig, evaluate_run, record_key
from privdiff.report import write_report
from tests.conftest import FAST_EVAL

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def two_runs(finished_tiny_run: Path, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("report")
    evaluated, plain = root / "evaluated", root / "not-evaluated"
    shutil.copytree(finished_tiny_run, evaluated)
    shutil.copytree(finished_tiny_run, plain)
    evaluate_run(evaluated, EvalConfig(**FAST_EVAL), show_progress=False)
    return [evaluated, plain]


@pytest.fixture(scope="module")
def report_path(two_runs: list[Path], tmp_path_factory) -> Path:
    return write_report(two_runs, tmp_path_factory.mktemp("out") / "report.html")


def test_report_is_self_contained(report_path: Path):
    page = report_path.read_text()
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(?!data:)[^"'\s>]*[./]""", page)  # only data: URIs
    assert "<script" not in page
    assert page.count("data:image/png;base64,") >= 4  # metric plot, 2 sample grids, training curves


def test_report_json_has_the_numbers_of_the_page(report_path: Path, two_runs: list[Path]):
    report = json.loads(report_path.with_suffix(".json").read_text())
    assert [r["name"] for r in report["runs"]] == ["evaluated", "not-evaluated"]
    metrics = json.loads((two_runs[0] / "metrics.json").read_text())["records"]
    fid_value = next(r["value"] for r in metrics if record_key(r) == "fid/members")
    assert report["runs"][0]["metrics"]["fid/members"]["value"] == fid_value
    assert report["runs"][1]["metrics"] == {}
    page = report_path.read_text()
    assert f"{fid_value:.4g}" in page
    assert "no formal guarantee" in page  # plain LoRA: privacy stated, not left blank


def test_report_refuses_bad_input(tmp_path: Path, two_runs: list[Path]):
    with pytest.raises(ConfigError, match="not found"):
        write_report([tmp_path / "nope"], tmp_path / "r.html")
    with pytest.raises(ConfigError, match="must end in .html"):
        write_report(two_runs, tmp_path / "r.pdf")
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "r.json").exists()


@pytest.mark.chromium
@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(report_path: Path, tmp_path: Path):
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1280,2400",
           f"--screenshot={shot}", report_path.resolve().as_uri()]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1280)
    non_white = (pixels < 240).mean()
    assert pixels.std() > 20 and non_white > 0.02, (pixels.std(), non_white)
    # The inline PNGs decoded: the plots and sample grids put saturated colour on the page.
    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert ((rgb.max(axis=2) - rgb.min(axis=2)) > 60).mean() > 0.005


@pytest.mark.slow
def test_run_table_shows_what_a_dp_run_did_not_the_plain_training_fields(tiny_pipeline_dir: Path, tmp_path: Path):
    """Issue 26, finding 6: DP-LoRA's row read train.steps and train.batch_size from the config (6 steps,
    batch 4 here) for a run of ceil(epochs / q) Poisson steps of expected size B."""
    from privdiff.training.run import run_training
    from tests.conftest import tiny_run_config

    cfg = tiny_run_config(tmp_path, tiny_pipeline_dir, **{"train.method": "dp-lora", "dp.target_epsilon": "null",
                                                           "dp.noise_multiplier": 1.0, "dp.expected_batch_size": 6,
                                                           "dp.epochs": 1.0, "dp.noise_multiplicity": 1})
    run = run_training(cfg, show_progress=False)
    summary = json.loads((run / "summary.json").read_text())
    settings = summary["settings"]
    assert settings["sampling"] == "poisson" and settings["expected_batch_size"] == 6
    assert settings["steps"] == summary["privacy"]["steps"] != cfg.train.steps
    page = write_report([run], tmp_path / "report.html").read_text()
    assert f"{settings['steps']} steps, Poisson batches of expected size 6" in page
    assert not re.search(rf"\b{cfg.train.steps} steps", page) and "batch 4" not in page
