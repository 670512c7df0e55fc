"""`privdiff check`: one verdict per axis, check.json + check.html, exit codes 0 / 1 / 2 (issue 31)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from privdiff.check import (
    CheckConfig,
    CheckThresholds,
    dp_guarantee,
    membership_axis,
    run_check,
)
from privdiff.cli import main
from privdiff.errors import ConfigError
from privdiff.models.inspect import read_header
from privdiff.runs.folder import LORA_WEIGHT_NAME

FAST = CheckConfig(attacks=["loss", "quantile"], bootstrap=20, thresholds=CheckThresholds(max_epsilon=8))


def kohya_copy(adapter: Path, out: Path) -> Path:
    """The same tensors with the header kohya sd-scripts writes: tag counts, dataset folders, a seed."""
    _, metadata, _ = read_header(adapter)
    metadata = {**metadata, "ss_tag_frequency": json.dumps({"img": {"my cat": 12, "sofa": 3}}),
                "ss_dataset_dirs": json.dumps({"12_cat": {"n_repeats": 12, "img_count": 20}}), "ss_seed": "42"}
    save_file(load_file(str(adapter)), str(out), metadata=metadata)
    return out


def record(auc: float, low: float, high: float, tpr1: float, aux_auc: float) -> dict:
    estimate = {"value": tpr1, "ci": [0.0, 1.0], "n": 200}
    return {"auc": {"value": auc, "ci": [low, high], "n": 400}, "aux_auc": aux_auc,
            "tpr_at_fpr": {"0.01": estimate, "0.05": estimate, "0.001": estimate}, "queries_per_example": 1,
            "access": "gray"}


def test_membership_fails_when_the_best_attack_is_clearly_above_chance():
    records = {"loss": record(0.62, 0.55, 0.69, 0.04, 0.60), "sima": record(0.90, 0.84, 0.95, 0.30, 0.88)}
    axis = membership_axis(records, 48, CheckThresholds())
    assert axis["verdict"] == "fail" and axis["best_attack"] == "sima" and not axis["tpr_at_1_fpr_resolved"]
    assert "unresolved" in axis["why"]


def test_membership_passes_at_chance_or_below_a_resolved_tpr_bound():
    at_chance = {"loss": record(0.52, 0.46, 0.58, 0.01, 0.51)}
    assert membership_axis(at_chance, 48, CheckThresholds())["verdict"] == "pass"
    above_but_no_worst_case = {"loss": record(0.56, 0.51, 0.61, 0.02, 0.55)}
    assert membership_axis(above_but_no_worst_case, 48, CheckThresholds())["verdict"] == "fail"  # 1 % unresolved
    assert membership_axis(above_but_no_worst_case, 200, CheckThresholds())["verdict"] == "pass"
    assert membership_axis(above_but_no_worst_case, 48, CheckThresholds(auc_margin=0.02))["verdict"] == "pass"


def test_the_dp_guarantee_is_read_from_the_header():
    assert dp_guarantee({"format": "pt"}) is None
    found = dp_guarantee({"privdiff.dp.epsilon": "7.99", "privdiff.dp.delta": "1e-05", "privdiff.dp.unit": "example"})
    assert found["epsilon"] == 7.99 and found["delta"] == 1e-5
    with pytest.raises(ConfigError, match="max_epsilon"):
        CheckThresholds(max_epsilon=0).validate()


@pytest.fixture(scope="module")
def kohya_check(finished_tiny_run: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("check")
    adapter = kohya_copy(finished_tiny_run / LORA_WEIGHT_NAME, out / "kohya.safetensors")
    return out, run_check(adapter, finished_tiny_run, out / "result", FAST, show_progress=False)


def test_a_kohya_header_with_tag_frequencies_fails_on_the_header(kohya_check):
    out, result = kohya_check
    assert result["verdict"] == "fail" and "header" in result["failed_axes"]
    keys = {f["key"] for f in result["axes"]["header"]["findings"] if f["severity"] == "high"}
    assert {"ss_tag_frequency", "ss_dataset_dirs"} <= keys
    assert result["axes"]["identity"]["verdict"] == "n/a"  # digits base: no weights attack
    assert result["axes"]["membership"]["best_attack"] in ("loss", "quantile")
    saved = json.loads((out / "result" / "check.json").read_text())
    assert saved == json.loads(json.dumps(result))
    page = (out / "result" / "check.html").read_text()
    assert "FAIL" in page and "header" in page and "<script" not in page


def test_a_maximum_epsilon_fails_a_file_without_a_dp_guarantee(kohya_check):
    _, result = kohya_check
    assert result["axes"]["dp"]["verdict"] == "fail" and result["axes"]["dp"]["guarantee"] is None
    assert set(result["failed_axes"]) == {"header", "dp"} or "membership" in result["failed_axes"]


def test_cli_exit_codes(kohya_check, finished_tiny_run: Path, tmp_path: Path, capsys):
    out, _ = kohya_check
    args = ["--data", str(finished_tiny_run), "--attacks", "loss", "--bootstrap", "20", "--quiet"]
    assert main(["check", str(out / "kohya.safetensors"), "--out", str(tmp_path / "a"), *args]) == 1
    printed = capsys.readouterr().out
    assert "header" in printed and "FAIL" in printed
    assert json.loads((tmp_path / "a" / "check.json").read_text())["verdict"] == "fail"
    assert main(["check", str(out / "kohya.safetensors"), "--data", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "not a fine-tuning run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_privdiffs_own_header_passes(finished_tiny_run: Path, tmp_path: Path):
    result = run_check(finished_tiny_run / LORA_WEIGHT_NAME, finished_tiny_run, tmp_path, FAST, show_progress=False)
    assert result["axes"]["header"]["verdict"] == "pass" and result["axes"]["header"]["findings"] == []


