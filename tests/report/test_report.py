"""The report card: self-contained HTML, report.json with the same numbers, renders in Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html import escape as html_escape
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


def _dp_shaped_copy(run: Path, dest: Path) -> Path:
    """A copy of `run` whose summary.json records a DP-LoRA run with values its config does not hold
    (Poisson steps, expected batch, q, ε), so the report can only show them by reading the summary."""
    shutil.copytree(run, dest)
    summary = json.loads((dest / "summary.json").read_text())
    summary["method"], summary["steps"], summary["wall_time_s"] = "dp-lora", 37, 12.5
    summary["settings"] = {**summary["settings"], "steps": 37, "sampling": "poisson", "expected_batch_size": 11,
                           "sample_rate": 0.34375, "learning_rate": 0.00123, "lora_rank": 3, "lora_alpha": 5.0,
                           "seed": 7}
    summary["settings"].pop("batch_size", None)
    summary["privacy"] = {"epsilon": 7.123, "delta": 1e-5, "accountant": "prv", "epsilon_pld": 7.11,
                          "noise_multiplier": 1.234, "max_grad_norm": 0.001, "noise_multiplicity": 2,
                          "sample_rate": 0.34375, "steps": 37}
    (dest / "summary.json").write_text(json.dumps(summary))
    return dest


@pytest.fixture(scope="module")
def audited_runs(finished_tiny_run: Path, tmp_path_factory) -> list[Path]:
    """The tiny run evaluated and audited (with its control), beside a DP-shaped copy of it."""
    from privdiff.audit.run import AuditConfig, run_audit

    root = tmp_path_factory.mktemp("headline")
    plain = root / "plain"
    shutil.copytree(finished_tiny_run, plain)
    evaluate_run(plain, EvalConfig(**FAST_EVAL), show_progress=False)
    for control in (False, True):
        run_audit(plain, AuditConfig(attacks=["loss", "sima"], bootstrap=20, control=control), show_progress=False)
    return [plain, _dp_shaped_copy(plain, root / "private")]


def _run_row(page: str, name: str) -> str:
    row = re.search(rf'<tr data-run="{re.escape(name)}">(.*?)</tr>', page, re.DOTALL)
    assert row, f"no runs-table row for {name}"
    return row.group(1)


def test_runs_table_fields_equal_each_runs_summary_json(audited_runs: list[Path], tmp_path: Path):
    """Issue 30 part 4: every field of the runs table is read from the run's own summary.json."""
    from privdiff.report.html import fmt

    page = write_report(audited_runs, tmp_path / "report.html").read_text()
    for run in audited_runs:
        summary = json.loads((run / "summary.json").read_text())
        row, settings, privacy = _run_row(page, run.name), summary["settings"], summary["privacy"]
        members = summary["membership"]["member_aux"] + summary["membership"]["member_test"]
        expected = [summary["method"], summary["dataset"]["name"],
                    f"{members} members of {summary['dataset']['num_examples']}", f"{settings['steps']} steps",
                    f"lr {fmt(settings['learning_rate'])}", f"seed {settings['seed']}",
                    f"rank {settings['lora_rank']}, α {fmt(settings['lora_alpha'])}", f"{fmt(summary['wall_time_s'])} s"]
        if settings.get("sampling") == "poisson":
            expected += [f"expected size {settings['expected_batch_size']}", f"q = {fmt(settings['sample_rate'])}",
                         f"ε = {fmt(privacy['epsilon'])}", f"δ = {fmt(privacy['delta'])}",
                         f"σ = {fmt(privacy['noise_multiplier'])}", f"C = {fmt(privacy['max_grad_norm'])}",
                         f"K = {privacy['noise_multiplicity']}", f"{privacy['steps']} steps"]
        else:
            expected += [f"batch {settings['batch_size']}", "no formal guarantee"]
        missing = [text for text in expected if text not in row]
        assert not missing, (run.name, missing)
    config_steps = 6  # what both runs' config.yaml says; the DP-shaped summary says 37
    assert f"{config_steps} steps" not in _run_row(page, "private")


def test_headline_is_the_first_section_with_a_verdict_per_run_and_the_chart(audited_runs: list[Path],
                                                                            tmp_path: Path):
    from privdiff.report.verdict import verdict

    page = write_report(audited_runs, tmp_path / "report.html").read_text()
    sections = re.findall(r"<h2>(.*?)</h2>", page)
    assert sections[0].startswith("Headline") and sections[1] == "Runs"
    headline = page[page.index("<h2>Headline"):page.index("<h2>Runs</h2>")]
    audit = json.loads((audited_runs[0] / "audit" / "audit.json").read_text())
    said = verdict(audit)["text"]
    assert said.startswith(("caught by ", "at chance", "above chance")) and html_escape(said) in headline
    assert "(7.12, 1e-05)-DP" in headline and "no formal guarantee" in headline  # the DP run and the plain run
    assert "<b>control</b>" in headline  # the base model, audited on the plain run's members
    assert headline.count("data:image/png;base64,") == 1  # the privacy-utility chart


def test_verdict_words_follow_the_null_sd_rules():
    from privdiff.report.verdict import verdict

    def audit(aucs: dict[str, tuple[float, float, float]], best: str) -> dict:
        return {"best_attack": best, "null_auc_sd": 0.05,
                "attacks": {n: {"auc": {"value": v, "ci": [lo, hi]}} for n, (v, lo, hi) in aucs.items()}}

    assert verdict(audit({"sima": (0.9, 0.84, 0.95), "loss": (0.7, 0.6, 0.8)}, "sima"))["text"] == \
        "caught by sima (AUC 0.900 [0.840, 0.950])"
    assert verdict(audit({"sima": (0.52, 0.41, 0.63), "loss": (0.45, 0.35, 0.55)}, "sima"))["kind"] == "at chance"
    # best on aux not above 0.5 + 2 sd at its lower end, but another attack beyond 3 sd: not "at chance"
    assert verdict(audit({"sima": (0.55, 0.45, 0.65), "loss": (0.68, 0.58, 0.78)}, "sima"))["kind"] == "above chance"
    assert verdict(None)["text"] == "not audited"
