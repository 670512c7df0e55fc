"""DP-LoRA end to end: run folder, header and summary fields, diffusers round trip, refusals, resume (§13.11-12)."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from privdiff.cli import main
from privdiff.dp.accounting import opacus_epsilon, pld_epsilon
from privdiff.models.lora import ALLOWED_HEADER_KEYS, LORA_WEIGHT_NAME, read_lora
from privdiff.training.run import run_training
from tests.conftest import tiny_run_config

DP_RUN = {"train.method": "dp-lora", "dp.target_epsilon": 4.0, "dp.epochs": 2.0, "dp.expected_batch_size": 4,
          "dp.noise_multiplicity": 2, "dp.physical_batch_size": 3, "train.learning_rate": 0.02}
HEADER_FIELDS = ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "noise_multiplicity",
                 "max_grad_norm", "accountant", "clipping", "unit", "neighbouring")


@pytest.fixture(scope="module")
def dp_run(tiny_pipeline_dir: Path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dp")
    return run_training(tiny_run_config(tmp, tiny_pipeline_dir, **DP_RUN), show_progress=False)


def test_summary_and_header_record_the_guarantee(dp_run: Path):
    privacy = json.loads((dp_run / "summary.json").read_text())["privacy"]
    _, header = read_lora(dp_run / LORA_WEIGHT_NAME)
    # 17 members, B = 4: q = 4/17, 2 epochs -> ceil(2 / q) = 9 steps; delta = min(1e-5, 0.1/17)
    assert privacy["sample_rate"] == pytest.approx(4 / 17) and privacy["steps"] == 9
    assert privacy["delta"] == 1e-5 and privacy["dataset_size"] == 17
    for key in ("epsilon_pld", "epsilon_rdp", "target_epsilon", "expected_batch_size", "dataset_size",
                "empty_batches", "opacus_version", "dp_accounting_version", "secure_rng"):
        assert key in privacy, key
    history = [(privacy["noise_multiplier"], privacy["sample_rate"], privacy["steps"])]
    assert privacy["epsilon"] == pytest.approx(opacus_epsilon(history, 1e-5, "prv", 1e-3))
    assert privacy["epsilon_pld"] == pytest.approx(pld_epsilon(history, 1e-5))
    assert 0.99 * 4.0 <= privacy["epsilon"] <= 4.0
    layers = privacy["per_example_gradients"]  # the lora engine's per-layer choice is on record
    assert layers["ghost_norms"] == "auto" and layers["materialised_layers"] + len(layers["ghost_layers"]) > 0
    assert header["privdiff.method"] == "dp-lora"
    for key in HEADER_FIELDS:
        value = header[f"privdiff.dp.{key}"]
        assert value == (repr(privacy[key]) if isinstance(privacy[key], float) else str(privacy[key])), key
    assert header["privdiff.dp.clipping"] == "flat" and header["privdiff.dp.unit"] == "example"
    assert set(header) <= set(ALLOWED_HEADER_KEYS) | {"privdiff.method"} | {f"privdiff.dp.{k}" for k in HEADER_FIELDS}
    assert "digit" not in json.dumps(header)  # no captions, paths or counts


def test_history_logs_the_dp_step(dp_run: Path):
    history = json.loads((dp_run / "history.json").read_text())
    assert [row["step"] for row in history] == list(range(1, 10))
    for row in history:
        assert {"batch_size", "grad_norm", "clipped_fraction", "epsilon_rdp"} <= set(row)
    assert history[-1]["epsilon_rdp"] >= json.loads((dp_run / "summary.json").read_text())["privacy"]["epsilon"]


def test_dp_adapter_loads_in_plain_diffusers(dp_run: Path, tiny_pipeline_dir: Path):
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir), local_files_only=True,
                                                   safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(dp_run), weight_name=LORA_WEIGHT_NAME)
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


@pytest.mark.parametrize("flags,message", [
    (["--target-epsilon", "0"], "target_epsilon"),
    (["--target-epsilon", "-1"], "target_epsilon"),
    (["--delta", "0"], "delta"),
    (["--delta", "0.1"], "1/N"),
    (["--expected-batch-size", "500"], "larger than"),
    (["--noise-multiplicity", "0"], "noise_multiplicity"),
    (["--max-grad-norm", "0"], "max_grad_norm"),
    (["--target-epsilon", "2", "--noise-multiplier", "1"], "not both"),
    (["--epochs", "2", "--steps", "3"], "not both"),
    (["--set", "train.max_grad_norm=1.0"], "per-example clipping"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_dp_settings_are_refused_before_anything_is_written(tiny_pipeline_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    code = main(["finetune", "--method", "dp-lora", "--pretrained", str(tiny_pipeline_dir), "--num-examples", "32",
                 "--out", str(out), "--quiet", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_gradient_checkpointing_is_refused(encoded_digits):
    from privdiff.errors import ModelError
    from tests.dp.conftest import dp_config, fresh_task

    task = fresh_task(encoded_digits, 8)
    task.unet.enable_gradient_checkpointing()
    method = __import__("privdiff.training.methods", fromlist=["get_method"]).get_method("dp-lora")(dp_config())
    with pytest.raises(ModelError, match="gradient checkpointing"):
        method.check_inputs(8, task.unet)


class Crash(RuntimeError):
    pass


@pytest.mark.slow
def test_resumed_dp_run_matches_the_uninterrupted_run(tiny_pipeline_dir: Path, tmp_path: Path):
    fixed = {**DP_RUN, "dp.target_epsilon": "null", "dp.noise_multiplier": 1.0, "train.checkpoint_every": 4}
    straight = run_training(tiny_run_config(tmp_path / "a", tiny_pipeline_dir, **fixed), show_progress=False)

    def crash(step: int, metrics: dict) -> None:
        if step == 6:
            raise Crash
    cfg = tiny_run_config(tmp_path / "b", tiny_pipeline_dir, **fixed)
    with pytest.raises(Crash):
        run_training(cfg, show_progress=False, on_step=crash)
    resumed = run_training(cfg, resume=True, show_progress=False)
    a, _ = read_lora(straight / LORA_WEIGHT_NAME)
    b, _ = read_lora(resumed / LORA_WEIGHT_NAME)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    pa = json.loads((straight / "summary.json").read_text())["privacy"]
    pb = json.loads((resumed / "summary.json").read_text())["privacy"]
    assert pa["steps"] == pb["steps"] == 9 and pa["epsilon"] == pb["epsilon"]


@pytest.mark.slow
def test_canary_audit_bound_stays_below_the_claimed_epsilon(dp_run: Path):
    """Audit sanity (§13.14): the one-run canary lower bound never exceeds the DP run's ε."""
    from privdiff.audit.canaries import canary_audit

    result = canary_audit(dp_run, num_canaries=32, attack="loss", show_progress=False)
    claimed = json.loads((dp_run / "summary.json").read_text())["privacy"]["epsilon"]
    assert result["claimed_epsilon"] == claimed
    assert result["r"] == 8 and 0 <= result["v"] <= result["r"]
    assert result["eps"] <= claimed
