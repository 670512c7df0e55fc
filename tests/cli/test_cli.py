"""The CLI is thin: options become config, errors become one line and exit code 2."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privdiff.cli import main


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert "privdiff 0.1.0" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--set", "train.stepz=3"], "unknown config key 'train.stepz'"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--steps", "0"], "train.steps must be >= 1"),
    (["--data", "no-such-dataset"], "unknown dataset 'no-such-dataset'"),
    (["--pretrained", "/no/such/folder"], "pretrained model folder not found"),
    (["--batch-size", "500"], "larger than the 133 training members"),
])
def test_finetune_bad_options(args: list[str], message: str, tmp_path: Path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--out", str(out), "--quiet", *args]) == 2
    assert message in _one_line_error(capsys)
    assert not out.exists()


@pytest.mark.slow
def test_finetune_cli_then_sample(tmp_path: Path, tiny_pipeline_dir: Path, capsys):
    out = tmp_path / "run"
    code = main(["finetune", "--pretrained", str(tiny_pipeline_dir), "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--num-examples", "16", "--set", "sample.num_images=2",
                 "--set", "sample.num_inference_steps=2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (out / "summary.json").exists()

    grid_a, grid_b = tmp_path / "a.png", tmp_path / "b.png"
    for grid in (grid_a, grid_b):
        assert main(["sample", str(out), "--num-images", "3", "--steps", "2", "--out", str(grid)]) == 0
    assert np.array_equal(np.asarray(Image.open(grid_a)), np.asarray(Image.open(grid_b)))  # seeded
    assert main(["sample", str(out), "--num-images", "3", "--steps", "2", "--scheduler", "ddpm",
                 "--prompt", "a handwritten digit one", "--out", str(tmp_path / "c.png")]) == 0


def test_sample_errors(tmp_path: Path, capsys):
    assert main(["sample", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "not a finished run folder" in _one_line_error(capsys)
    assert main(["sample", "--out", str(tmp_path / "x.png")]) == 2
    assert "no prompts" in _one_line_error(capsys)
    assert main(["sample", "--lora", str(tmp_path / "missing.safetensors"), "--prompt", "a",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "LoRA file not found" in _one_line_error(capsys)
    assert not (tmp_path / "x.png").exists()


def test_config_file_via_cli(tmp_path: Path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  steps: -4\n")
    assert main(["finetune", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "train.steps must be >= 1" in _one_line_error(capsys)


@pytest.mark.parametrize("args, message", [
    (["audit", "RUN", "--attacks", "lira-online", "--shadows", "3"],
     "audit: --shadows must be even and >= 2 for LiRA, got 3"),
    (["audit", "RUN", "--set", "cp_fpr=2"], "audit: cp_fpr must be in [0, 1]"),
    (["audit", "RUN", "--config", "CONFIG"], "unknown config key 'steps'"),
    (["evaluate", "RUN", "--set", "scheduler=euler"], "config key 'scheduler' must be one of ddim, ddpm (got 'euler')"),
    (["evaluate", "RUN", "--config", "CONFIG"], "unknown config key 'steps'"),
    (["pretrain", "--out", "RUN", "--vae-steps", "0"], "num_glyphs, vae_steps and unet_steps must be >= 1"),
    (["pretrain", "--out", "RUN", "--config", "CONFIG"], "unknown config key 'steps'"),
])
def test_audit_evaluate_and_pretrain_settings_are_refused_before_any_work(args, message, tmp_path: Path, capsys):
    (tmp_path / "c.yaml").write_text("steps: 3\n")
    args = [{"RUN": str(tmp_path / "run"), "CONFIG": str(tmp_path / "c.yaml")}.get(a, a) for a in args]
    assert main(args) == 2
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def _built_config(monkeypatch, target: str, argv: list[str]):
    """The config object `privdiff ...` hands to `target` (which is replaced, so nothing runs)."""
    from privdiff.errors import ConfigError

    seen = []

    def capture(*args, **kwargs):
        seen.append(next(a for a in args if dataclasses.is_dataclass(a)))
        raise ConfigError("captured")

    monkeypatch.setattr(target, capture)
    assert main(argv) == 2 and len(seen) == 1
    return seen[0]


def test_audit_evaluate_and_pretrain_flags_build_the_same_configs_as_before(tmp_path: Path, monkeypatch, capsys):
    """Flags became overrides of `build_config`: the objects are the ones the flags used to construct."""
    from privdiff.audit.run import AuditConfig
    from privdiff.evaluation import EvalConfig
    from privdiff.recipes.glyph_base import PretrainConfig

    run, recipe = str(tmp_path / "run"), tmp_path / "recipe.yaml"
    audit = "privdiff.audit.run.run_audit"
    assert _built_config(monkeypatch, audit, ["audit", run]) == AuditConfig()
    assert _built_config(monkeypatch, audit, ["audit", run, "--attacks", "loss, pia", "--shadows", "4", "--seed", "3",
                                              "--bootstrap", "50", "--control"]) == \
        AuditConfig(attacks=["loss", "pia"], audit_seed=3, shadows=4, bootstrap=50, control=True)
    evaluate = "privdiff.evaluation.evaluate_run"
    assert _built_config(monkeypatch, evaluate, ["evaluate", run]) == EvalConfig()
    assert _built_config(monkeypatch, evaluate, ["evaluate", run, "--quick"]) == EvalConfig(num_samples=256)
    assert _built_config(monkeypatch, evaluate, ["evaluate", run, "--quick", "--num-samples", "300", "--features",
                                                 "digits", "--eval-seed", "2", "--steps", "10", "--guidance-scale",
                                                 "1.5", "--bootstrap", "30", "--precision-recall"]) == \
        EvalConfig(num_samples=300, features="digits", eval_seed=2, num_inference_steps=10, guidance_scale=1.5,
                   bootstrap=30, precision_recall=True)
    pretrain = "privdiff.recipes.glyph_base.pretrain"
    assert _built_config(monkeypatch, pretrain, ["pretrain", "--out", run]) == PretrainConfig()
    recipe.write_text("vae_steps: 7\nunet_steps: 9\n")  # a file, then flags over it
    assert _built_config(monkeypatch, pretrain, ["pretrain", "--out", run, "--config", str(recipe), "--num-glyphs",
                                                 "64", "--seed", "2", "--unet-steps", "5"]) == \
        PretrainConfig(num_glyphs=64, vae_steps=7, unet_steps=5, seed=2)


@pytest.mark.long
def test_demo_end_to_end(tmp_path: Path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0  # the full demo recipe: the signal check below
    summary = json.loads((out / "lora" / "summary.json").read_text())
    assert summary["steps"] == 1000 and summary["dataset"]["name"] == "digits"
    assert summary["membership"] == {"member_aux": 48, "member_test": 56, "nonmember_aux": 48,
                                     "nonmember_test": 48}
    assert summary["metrics"]["fid/members"]["n_generated"] == 256  # quick evaluation mode
    assert (out / "lora" / "metrics.json").is_file()
    printed = capsys.readouterr().out
    assert "demo finished" in printed and f"report card: {out / 'report.html'}" in printed
    page = (out / "report.html").read_text()
    assert "kid/members" in page and "https://" not in page and "Membership audit" in page
    assert page.index("<h2>Headline") < page.index("<h2>Runs</h2>")
    audit = json.loads((out / "lora" / "audit" / "audit.json").read_text())
    assert set(audit["attacks"]) == {"loss", "pia", "secmi", "sima", "proxy"}
    # Signal (membership-audit.md §9.8): the over-fitted demo LoRA is caught, by the attack chosen on aux (0.906 measured).
    best = audit["attacks"][audit["best_attack"]]
    assert best["auc"]["value"] >= 0.8 and best["auc"]["ci"][0] > 0.5 + 2 * audit["null_auc_sd"], best
    # Control at the demo's sizes (membership-audit.md §9.8): on the base model every attack is within 3 null sd of 0.5.
    control = json.loads((out / "lora" / "audit" / "control" / "audit.json").read_text())
    for name, attack in control["attacks"].items():
        assert abs(attack["auc"]["value"] - 0.5) <= 3 * control["null_auc_sd"], (name, attack["auc"])
    assert (out / "report.json").is_file()
    # The DP-LoRA run beside it: the guarantee it claims, on the same members, audited and reported.
    dp = json.loads((out / "dp-lora" / "summary.json").read_text())
    privacy = dp["privacy"]
    assert 0.99 * 8 <= privacy["epsilon"] <= 8 and privacy["delta"] == 1e-5
    assert privacy["sample_rate"] == 0.25 and privacy["steps"] == 200 == dp["steps"]
    assert json.loads((out / "dp-lora" / "membership.json").read_text())["roles"] == \
        json.loads((out / "lora" / "membership.json").read_text())["roles"]
    dp_audit = json.loads((out / "dp-lora" / "audit" / "audit.json").read_text())
    assert dp_audit["claimed_epsilon"] == privacy["epsilon"]
    assert "guarantee: (" in printed and "dp-lora" in page
    # demo.json: every phase timed, and the three claims hold (the benchmark reads them there).
    record = json.loads((out / "demo.json").read_text())
    assert not record["full"] and set(record["claims"]) == {"lora caught", "dp-lora at chance", "control at chance"}
    assert all(claim["holds"] for claim in record["claims"].values()), record["claims"]
    assert {"train lora", "train dp-lora", "audit control", "report"} <= set(record["phases_s"])
    assert not (out / "smp-lora").exists() and "Matched utility" not in page  # behind --full
    # privdiff check, the release gate (issue 31): the plain LoRA fails on membership, the DP-LoRA passes.
    for run, code, verdict in (("lora", 1, "fail"), ("dp-lora", 0, "pass")):
        adapter = out / run / "pytorch_lora_weights.safetensors"
        assert main(["check", str(adapter), "--data", str(out / run), "--out", str(tmp_path / f"check-{run}"),
                     "--attacks", "sima,loss", "--quiet"]) == code, run
        checked = json.loads((tmp_path / f"check-{run}" / "check.json").read_text())
        assert checked["axes"]["membership"]["verdict"] == verdict and checked["axes"]["header"]["verdict"] == "pass"


@pytest.mark.long
def test_demo_full_adds_smp_lora_and_the_early_stopped_lora(tmp_path: Path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--full", "--out", str(out), "--quiet"]) == 0
    page = (out / "report.html").read_text()
    # SMP-LoRA on the same members with the plain recipe, and the plain LoRA stopped at its utility.
    smp = json.loads((out / "smp-lora" / "summary.json").read_text())
    assert smp["method"] == "smp-lora" and smp["steps"] == 1000 and smp["smp"]["diverged"] is False
    assert json.loads((out / "smp-lora" / "membership.json").read_text())["roles"] == \
        json.loads((out / "lora" / "membership.json").read_text())["roles"]
    assert (out / "smp-lora" / "smp_log.jsonl").is_file() and (out / "smp-lora" / "audit" / "audit.json").is_file()
    early = json.loads((out / "lora-early" / "summary.json").read_text())["early_stopped"]
    assert early["matched_to"] == str(out / "smp-lora") and early["of_steps"] == 1000
    assert (out / "lora-early" / "audit" / "audit.json").is_file()
    assert "Matched utility" in page and "Training against the proxy attacker" in page
    record = json.loads((out / "demo.json").read_text())
    assert record["full"] and all(claim["holds"] for claim in record["claims"].values())


def test_demo_summary_reads_a_run_with_no_loss_on_record(tmp_path: Path):
    """`demo --steps 5` is shorter than the loss-logging interval: the summary says n/a, no traceback."""
    from privdiff.demo import DemoResult

    run = tmp_path / "lora"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"final_loss": None, "steps": 5, "metrics": {}}))
    text = DemoResult(run_dirs={"lora": run}, report=tmp_path / "report.html", wall_time_s=1.0).describe()
    assert f"lora       {run}  (final loss n/a, 5 steps)" in text


def test_an_unforeseen_exception_is_one_line_and_exit_1(monkeypatch, capsys):
    """Anything that is not a PrivdiffError: 'internal error: ...', exit 1, and a hint for the traceback."""
    def broken(path):
        raise KeyError("no such field\nspread over lines")
    monkeypatch.setattr("privdiff.models.inspect.inspect_file", broken)
    monkeypatch.delenv("PRIVDIFF_DEBUG", raising=False)
    assert main(["inspect", "whatever.safetensors"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("internal error: KeyError:")
    assert "set PRIVDIFF_DEBUG=1 for the traceback" in err
    monkeypatch.setenv("PRIVDIFF_DEBUG", "1")
    assert main(["inspect", "whatever.safetensors"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("internal error:")


def test_error_text_with_brackets_is_printed_verbatim(tmp_path: Path, capsys):
    """Rich markup in a message (a path like runs/[x]) must not be eaten or crash the error line."""
    out = tmp_path / "[bold]run"
    assert main(["finetune", "--out", str(out), "--steps", "0"]) == 2
    assert "train.steps must be >= 1" in _one_line_error(capsys)
    assert main(["inspect", str(tmp_path / "[red]missing.safetensors")]) == 2
    assert "[red]missing.safetensors: no such file" in _one_line_error(capsys)


def test_no_cache_reaches_the_config_of_finetune_audit_and_early_stop(tmp_path: Path, monkeypatch, capsys):
    from privdiff.audit.run import AuditConfig
    from privdiff.errors import ConfigError

    run = str(tmp_path / "run")
    finetune = "privdiff.training.run.run_training"
    assert _built_config(monkeypatch, finetune, ["finetune", "--out", run]).cache.enabled is True
    assert _built_config(monkeypatch, finetune, ["finetune", "--out", run, "--no-cache"]).cache.enabled is False
    assert _built_config(monkeypatch, "privdiff.audit.run.run_audit", ["audit", run, "--no-cache"]) == \
        AuditConfig(cache=False)
    seen = []

    def capture(*args, **kwargs):
        seen.append(kwargs["cache"])
        raise ConfigError("captured")

    monkeypatch.setattr("privdiff.training.early_stop.early_stop_like", capture)
    for flags in ([], ["--no-cache"]):
        assert main(["early-stop", run, "--match", run, "--out", str(tmp_path / "early"), *flags]) == 2
    assert seen == [True, False]
