"""`privdiff audit` end to end on a tiny run: audit.json, LiRA shadows, control, canaries, report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from privdiff.audit.canaries import canary_audit, draw_canaries, guesses
from privdiff.audit.run import AuditConfig, run_audit
from privdiff.audit.shadows import balanced_masks
from privdiff.cli import main
from privdiff.errors import ConfigError

FAST = {"bootstrap": 20}


@pytest.fixture(scope="module")
def audited(finished_tiny_run: Path, tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("audit") / "run"
    shutil.copytree(finished_tiny_run, run)
    cfg = AuditConfig(attacks=["loss", "pia", "secmi", "sima", "lira-online", "lira-offline"], shadows=2, **FAST)
    return run, run_audit(run, cfg, show_progress=False)


def test_audit_json_has_every_field_of_the_spec(audited):
    run, result = audited
    saved = json.loads((run / "audit" / "audit.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("manifest_hash", "audit_seed", "n_members_test", "n_nonmembers_test", "attacks", "best_attack",
                "eps_lower_bound"):
        assert key in saved
    assert saved["n_members_test"] == 9 and saved["n_nonmembers_test"] == 7
    for name, r in saved["attacks"].items():
        for key in ("auc", "asr", "asr_aux_threshold", "tpr_at_fpr", "tpr_at_fpr_conservative",
                    "resolution_limited", "queries_per_example", "access", "fitted", "examples_per_second"):
            assert key in r, (name, key)
        assert set(r["tpr_at_fpr"]) == {"0.001", "0.01", "0.05"}
        # one result shape: value, its 95 % interval and n (16 test examples; TPR over the 9 members)
        for estimate in (r["auc"], r["asr"], *r["tpr_at_fpr"].values()):
            assert set(estimate) == {"value", "ci", "n"} and estimate["ci"][0] <= estimate["value"] <= estimate["ci"][1]
        assert r["auc"]["n"] == 16 and r["tpr_at_fpr"]["0.05"]["n"] == 9
        assert r["resolution_limited"]["0.05"]  # 7 non-members: FPR 5 % is below 1/7
    assert saved["attacks"]["lira-online"]["queries_per_example"] == 8 * 3
    assert saved["eps_lower_bound"]["cp"]["indicative"] is True
    scores = np.load(run / "audit" / "scores.npz")
    assert set(scores.files) >= {"ids", "labels", "loss", "lira-online"} and len(scores["ids"]) == 16
    assert (run / "audit" / "roc_loglog.png").stat().st_size > 1000


def test_shadow_masks_are_balanced_and_saved(audited):
    run, _ = audited
    masks = np.array(json.loads((run / "audit" / "shadows" / "masks.json").read_text())["masks"])
    assert masks.shape == (2, 32) and (masks.sum(0) == 1).all()
    big = balanced_masks(8, 833, 0)
    assert (big.sum(0) == 4).all()
    with pytest.raises(ValueError):
        balanced_masks(3, 10, 0)


@pytest.mark.slow
def test_audit_is_deterministic(audited, tmp_path):
    run, first = audited
    again = tmp_path / "again"
    shutil.copytree(run, again)
    shutil.rmtree(again / "audit" / "shadows" / "shadow-00")  # retrained from the saved masks
    second = run_audit(again, AuditConfig(attacks=["loss", "pia", "secmi", "sima", "lira-online", "lira-offline"],
                                          shadows=2, **FAST), show_progress=False)
    for name in first["attacks"]:
        assert first["attacks"][name]["auc"] == second["attacks"][name]["auc"], name


@pytest.mark.slow
def test_control_audits_the_base_model_in_its_own_folder(audited):
    run, result = audited
    control = run_audit(run, AuditConfig(attacks=["loss", "sima"], control=True, **FAST), show_progress=False)
    assert control["target"].startswith("base model") and (run / "audit" / "control" / "audit.json").is_file()
    assert control["attacks"]["loss"]["auc"] != result["attacks"]["loss"]["auc"]


def test_bad_audit_settings_are_refused(audited):
    run, _ = audited
    with pytest.raises(ConfigError, match="unknown attack"):
        run_audit(run, AuditConfig(attacks=["gsa9"]))
    with pytest.raises(ConfigError, match="even"):
        run_audit(run, AuditConfig(attacks=["lira-online"], shadows=3))


def test_canaries_are_independent_halves_outside_the_manifest():
    spare = [f"x{i}" for i in range(5000)]
    canaries, included = draw_canaries(spare, 2000, seed=0)
    assert len(set(canaries)) == 2000 and set(canaries) <= set(spare)
    assert binomtest(int(included.sum()), 2000, 0.5).pvalue > 0.001
    with pytest.raises(ConfigError, match="only 10 examples"):
        draw_canaries(spare[:10], 64, seed=0)


def test_guesses_take_the_extremes():
    scores = np.array([0.1, 0.9, 0.5, 0.8, 0.2, 0.3, 0.7, 0.4])
    included = np.array([0, 1, 0, 1, 1, 0, 0, 0], bool)
    assert guesses(scores, included, 2) == (4, 3)  # IN: 0.9 ✓, 0.8 ✓; OUT: 0.1 ✓, 0.2 ✗


@pytest.mark.slow
def test_canary_audit_end_to_end(audited):
    run, _ = audited
    result = canary_audit(run, num_canaries=16, attack="loss", show_progress=False)
    saved = json.loads((run / "audit" / "canaries.json").read_text())
    manifest = json.loads((run / "membership.json").read_text())
    assert not set(saved["canaries"]) & set(manifest["roles"])
    assert result["r"] == 4 and 0 <= result["v"] <= 4 and result["eps"] >= 0
    audit = json.loads((run / "audit" / "audit.json").read_text())
    assert audit["eps_lower_bound"]["one_run"]["m"] == 16
    canary_manifest = json.loads((run / "audit" / "canary-run.membership.json").read_text())
    trained = {i for i, r in canary_manifest["roles"].items() if r.startswith("member")}
    included = {c for c, keep in zip(saved["canaries"], saved["included"]) if keep}
    assert included <= trained and not (set(saved["canaries"]) - included) & trained


@pytest.mark.slow
def test_cli_audit_and_report_show_the_audit(audited, tmp_path, capsys):
    run, _ = audited
    assert main(["audit", str(run), "--attacks", "loss,sima", "--bootstrap", "20", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "AUC" in printed and "best attack" in printed
    assert "TPR at 1.0% FPR is not resolved: it needs >= 100 test non-members, this split has 7" in printed
    assert "n/r" in printed
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "Membership audit" in page and "Clopper" in page and "Control (base model" in page
    assert main(["audit", str(run), "--attacks", "nope"]) == 2
    assert "unknown attack" in capsys.readouterr().err


@pytest.mark.slow
def test_an_evaluated_and_audited_run_can_be_overwritten(audited, tmp_path):
    from privdiff.config import load_config
    from privdiff.training.run import run_training

    run, _ = audited
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "eval").mkdir(exist_ok=True)
    cfg = load_config(copy / "config.yaml", [f"output_dir={copy}"])
    run_training(cfg, overwrite=True, show_progress=False)
    assert not (copy / "audit").exists() and (copy / "summary.json").is_file()
