"""Early stopping at matched utility (smp-lora.md §8.3 b): the snapshot closest in held-out loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privdiff.cli import main
from privdiff.errors import ConfigError
from privdiff.runs.folder import open_run
from privdiff.training.run import run_manifest, run_pipeline
from privdiff.training.early_stop import early_stop_like
from privdiff.training.run import run_training
from tests.conftest import tiny_run_config


@pytest.fixture(scope="module")
def runs(tiny_pipeline_dir: Path, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("early")
    plain = run_training(tiny_run_config(tmp / "plain", tiny_pipeline_dir, **{
        "train.steps": 8, "train.snapshots": 4, "train.learning_rate": 0.05}), show_progress=False)
    paired = {"membership.manifest": str(plain / "membership.json"), "train.learning_rate": 0.05}
    short = run_training(tiny_run_config(tmp / "short", tiny_pipeline_dir, **{"train.steps": 3, **paired}),
                         show_progress=False)
    other = run_training(tiny_run_config(tmp / "other", tiny_pipeline_dir, **{"membership.seed": 1, "train.steps": 1}),
                         show_progress=False)
    return {"plain": plain, "short": short, "other": other, "tmp": tmp}


@pytest.mark.slow
def test_the_closest_snapshot_is_chosen_and_written_as_a_run(runs):
    out = early_stop_like(runs["plain"], runs["short"], runs["tmp"] / "early")
    match = json.loads((out / "summary.json").read_text())["early_stopped"]
    losses = {c["step"]: c["loss"] for c in match["candidates"]}
    assert sorted(losses) == [2, 4, 6, 8]  # 4 snapshots, the last one being the final adapter
    assert match["step"] == min(losses, key=lambda s: abs(losses[s] - match["target_loss"]))
    assert match["loss"] == losses[match["step"]] and match["matched_on"].startswith("mean held-out")
    run = open_run(out)
    assert run.summary["steps"] == match["step"] == run.config.train.steps
    assert all(row["step"] <= match["step"] for row in run.history)
    assert run_manifest(run).roles == run_manifest(open_run(runs["plain"])).roles
    run_pipeline(run)  # the copied adapter loads


@pytest.mark.slow
def test_matching_a_run_to_itself_picks_its_final_adapter(runs):
    out = early_stop_like(runs["plain"], runs["plain"], runs["tmp"] / "self")
    match = json.loads((out / "summary.json").read_text())["early_stopped"]
    assert match["step"] == 8 and match["loss"] == match["target_loss"]


def test_refusals(runs):
    with pytest.raises(ConfigError, match="different membership manifests"):
        early_stop_like(runs["plain"], runs["other"], runs["tmp"] / "x")
    with pytest.raises(ConfigError, match="no snapshots"):
        early_stop_like(runs["short"], runs["plain"], runs["tmp"] / "y")
    assert not (runs["tmp"] / "x").exists() and not (runs["tmp"] / "y").exists()
    busy = runs["tmp"] / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        early_stop_like(runs["plain"], runs["short"], busy)
    assert (busy / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_cli_early_stop(runs, capsys):
    assert main(["early-stop", str(runs["plain"]), "--match", str(runs["short"]), "--out",
                 str(runs["tmp"] / "cli")]) == 0
    assert "run folder:" in capsys.readouterr().out
    assert main(["early-stop", str(runs["short"]), "--match", str(runs["plain"]), "--out",
                 str(runs["tmp"] / "cli2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no snapshots" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_report_shows_the_matched_comparison_with_paired_differences(runs):
    from privdiff.audit.run import AuditConfig, run_audit
    from privdiff.report import write_report

    early = early_stop_like(runs["plain"], runs["short"], runs["tmp"] / "early-report")
    folders = [runs["plain"], runs["short"], early]
    for folder in folders:
        run_audit(folder, AuditConfig(attacks=["loss"], bootstrap=20), show_progress=False)
    page = write_report(folders, runs["tmp"] / "report.html").read_text()
    report = json.loads((runs["tmp"] / "report.json").read_text())
    name = {r["path"]: r["name"] for r in report["runs"]}  # folders named alike are qualified by parent
    auc = {name[str(f)]: json.loads((f / "audit" / "audit.json").read_text())["attacks"]["loss"]["auc"]["value"]
           for f in folders}
    (row,) = report["matched"]
    assert row["defended"] == name[str(runs["short"])] and row["attack"] == "loss"
    assert set(row["differences"]) == {"early-stopped", "full"}
    assert row["differences"]["full"]["run"] == name[str(runs["plain"])]
    for d in row["differences"].values():
        assert d["value"] == pytest.approx(auc[row["defended"]] - auc[d["run"]], abs=1e-12)
        assert d["ci"][0] <= d["ci"][1] and d["resamples"] == 1000
    assert "Matched utility" in page and "minus on" in page
