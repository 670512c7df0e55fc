"""The attack × defence grid, its report-card section, and `privdiff split attack` on the command line."""

from __future__ import annotations

import json

import pytest

from privdiff.cli import main
from privdiff.report import write_report
from privdiff.split.attacks.grid import markdown_table, run_grid

TINY = ["data.num_examples=24", "data.test_examples=8", "eval.num_inference_steps=2"]


@pytest.fixture(scope="module")
def grid_folder(tiny_pipeline_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("grid")
    run_grid(folder, base_overrides=[f"model.pretrained={tiny_pipeline_dir}", *TINY],
             defences=["unprotected", "hardened s=1 R=4, t≥500, condition noise"], attack_names=["analytic"],
             victims=8, utility_overrides=["train.steps=2", "train.request_size=4", "train.batch_size=null",
                                           "train.passes=1", "eval.num_samples=2"], show_progress=False)
    return folder


def test_grid_scores_every_defence_and_accounts_the_hardened_one(grid_folder):
    grid = json.loads((grid_folder / "split_attacks.json").read_text())
    rows = {r["defence"]: r for r in grid["rows"]}
    assert set(rows) == {"unprotected", "hardened s=1 R=4, t≥500, condition noise"}
    open_row = rows["unprotected"]["attacks"]["analytic"]
    # the tiny test autoencoder is untrained, so SSIM is judged against its own ceiling here
    for target in ("image", "condition"):
        ceiling = open_row["references"]["ceiling"][target]["all"]["ssim"]["value"]
        assert open_row["scores"][target]["all"]["ssim"]["value"] == pytest.approx(ceiling, abs=0.1)
    assert set(open_row["leaks"]) == {"image", "condition"}
    assert open_row["latent_errors"]["x_t"]["relative_error"] < 1e-3
    hardened = rows["hardened s=1 R=4, t≥500, condition noise"]
    privacy = hardened["utility"]["local_privacy"]
    assert privacy["worst_epsilon"] > 0 and privacy["worst_epsilon"] != float("inf")
    assert rows["unprotected"]["utility"]["local_privacy"] is None  # no guarantee to report
    table = markdown_table(grid)
    assert table.count("\n") == 2 + len(rows) and "analytic image / condition" in table
    assert (grid_folder / "split_attacks.png").stat().st_size > 1000


def test_report_card_shows_the_grid(grid_folder, tmp_path):
    page = write_report([grid_folder], tmp_path / "report.html").read_text()
    assert "attacks × defences" in page and "hardened s=1 R=4" in page and "<table>" in page
    assert json.loads((tmp_path / "report.json").read_text())["split_attacks"][0]["rows"]


def test_unknown_defence_is_a_one_line_error(tmp_path, capsys):
    assert main(["split", "attack-grid", "--out", str(tmp_path), "--defence", "moat", "--no-utility"]) == 2
    err = capsys.readouterr().err
    assert "unknown defence" in err and err.count("\n") == 1


@pytest.mark.slow
def test_cli_attack_writes_results_and_refuses_wrong_design(tiny_pipeline_dir, tmp_path, capsys):
    common = ["--set", f"model.pretrained={tiny_pipeline_dir}"] + [a for o in TINY for a in ("--set", o)]
    out = tmp_path / "attack"
    assert main(["split", "attack", "--attack", "analytic", "--victims", "8", "--out", str(out), *common]) == 0
    result = json.loads((out / "attack.json").read_text())
    assert result["latent_errors"]["z0"]["relative_error"] < 1e-3  # as published: recovered analytically
    assert "git_commit" in json.dumps(result["record"]) and (out / "reconstructions.png").is_file()
    assert "SSIM" in capsys.readouterr().out
    assert main(["split", "attack", "--attack", "analytic", "--out", str(out), *common]) == 2  # exists
    assert main(["split", "attack", "--attack", "fsha", "--out", str(tmp_path / "f"), *common]) == 2
    err = capsys.readouterr().err
    assert "targets the vanilla design" in err
    assert main(["split", "attack", "--attack", "telepathy", "--out", str(tmp_path / "g"), *common]) == 2
    assert main(["split", "attack", "--attack", "analytic", "--victims", "9", "--out", str(tmp_path / "h"), *common]) == 2
