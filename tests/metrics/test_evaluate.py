"""`privdiff evaluate` end to end on a tiny run: records, intervals, pairing and determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from privdiff.errors import ConfigError
from privdiff.evaluation import EvalConfig, evaluate_run, generation_prompts, record_key
from privdiff.metrics.heldout import fixed_noise, heldout_losses, heldout_timesteps
from privdiff.runs.folder import open_run
from privdiff.training.run import run_dataset, run_manifest, run_pipeline
from tests.conftest import FAST_EVAL


@pytest.fixture(scope="module")
def evaluated(finished_tiny_run: Path, tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("eval") / "run"
    shutil.copytree(finished_tiny_run, run)
    return run, evaluate_run(run, EvalConfig(**FAST_EVAL), show_progress=False)


def test_heldout_timesteps_are_the_bin_midpoints_of_the_spec():
    assert heldout_timesteps(1000, 8) == [62, 187, 312, 437, 562, 687, 812, 937]


def test_fixed_noise_depends_on_example_and_draw_only():
    a = fixed_noise((4, 8, 8), 0, "digits-0001", 3)
    assert torch.equal(a, fixed_noise((4, 8, 8), 0, "digits-0001", 3))
    assert not torch.equal(a, fixed_noise((4, 8, 8), 0, "digits-0002", 3))
    assert not torch.equal(a, fixed_noise((4, 8, 8), 0, "digits-0001", 4))
    assert not torch.equal(a, fixed_noise((4, 8, 8), 1, "digits-0001", 3))


def test_heldout_losses_are_paired_across_models_and_batchings(finished_tiny_run: Path):
    from privdiff.diffusion.task import encode_images, encode_prompts

    run = open_run(finished_tiny_run)
    pipe = run_pipeline(run)
    subset = run_dataset(run).subset(run_manifest(run).ids("nonmember_test"))
    latents, contexts = encode_images(pipe, subset.images_tensor()), encode_prompts(pipe, subset.captions())
    ids = [e.id for e in subset.examples]
    seen = []

    def recording(module, args, kwargs):
        seen.append(args[0].clone())  # the noisy input x_t = f(z0, fixed noise, t)

    handle = pipe.unet.register_forward_pre_hook(recording, with_kwargs=True)
    whole, _ = heldout_losses(pipe.unet, pipe.scheduler, latents, contexts, ids, seed=0, batch_size=64)
    inputs_one_model = torch.cat(seen)
    seen.clear()
    with torch.no_grad():  # a different model sees the same x_t (paired), so only the loss differs
        for p in pipe.unet.parameters():
            p.add_(0.01)
    other, _ = heldout_losses(pipe.unet, pipe.scheduler, latents, contexts, ids, seed=0, batch_size=64)
    handle.remove()
    assert torch.equal(torch.cat(seen), inputs_one_model)
    assert not np.allclose(whole, other)
    batched, _ = heldout_losses(pipe.unet, pipe.scheduler, latents, contexts, ids, seed=0, batch_size=3)
    np.testing.assert_allclose(batched, other, rtol=1e-5)


def test_generation_prompts_balance_classes():
    prompts = generation_prompts([f"a handwritten digit {w}" for w in ("one", "two", "two", "three")], 9)
    assert prompts.count("a handwritten digit one") == prompts.count("a handwritten digit two") == 3


def test_metrics_json_has_every_record_with_an_interval(evaluated):
    run, result = evaluated
    saved = json.loads((run / "metrics.json").read_text())
    keys = {record_key(r) for r in saved["records"]}
    for key in ("fid/members", "fid/nonmember_test", "kid/members", "kid/nonmember_test", "accuracy/digit",
                "accuracy_ceiling/digit", "heldout_loss/member_test", "heldout_loss/nonmember_test",
                "heldout_loss/nonmember_aux", "generalisation_gap"):
        assert key in keys, key
    for r in saved["records"]:
        lo, hi = r["ci"]
        assert lo <= r["value"] <= hi, record_key(r)
        assert "dp_covered" in r and "eval_seed" in r
    fid_record = next(r for r in saved["records"] if record_key(r) == "fid/members")
    assert fid_record["n_generated"] == 20 and fid_record["n_reference"] == 17
    assert fid_record["extractor"].startswith("digits@sha256:")
    assert fid_record["sampler"] == {"scheduler": "ddim", "num_inference_steps": 3, "guidance_scale": 3.0,
                                     "eta": 0.0}
    assert "warning" in fid_record  # 17 references for 64-d features: FID flagged as unreliable
    accuracy = next(r for r in saved["records"] if record_key(r) == "accuracy/digit")
    assert sum(c["n"] for c in accuracy["per_class"].values()) == 20
    assert (run / "eval" / "samples.png").is_file() and (run / "eval" / "generated_features.npz").is_file()


def test_summary_metrics_are_filled(evaluated):
    run, result = evaluated
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metrics"]["fid/members"]["value"] == next(
        r["value"] for r in result["records"] if record_key(r) == "fid/members")
    assert summary["method"] == "lora"  # the rest of the summary is kept


@pytest.mark.slow
def test_metrics_are_identical_across_two_runs_with_the_same_seed(evaluated, tmp_path):
    run, first = evaluated
    again = tmp_path / "again"
    shutil.copytree(run, again)
    second = evaluate_run(again, EvalConfig(**FAST_EVAL), show_progress=False)
    assert first["records"] == second["records"]


@pytest.mark.slow
def test_a_different_eval_seed_changes_the_samples(evaluated, tmp_path):
    run, first = evaluated
    other = tmp_path / "other"
    shutil.copytree(run, other)
    second = evaluate_run(other, EvalConfig(**{**FAST_EVAL, "eval_seed": 1}), show_progress=False)
    assert [r["value"] for r in first["records"]][:2] != [r["value"] for r in second["records"]][:2]


def test_evaluate_refuses_unfinished_folders_and_bad_settings(tmp_path: Path):
    with pytest.raises(ConfigError, match="run folder not found"):
        evaluate_run(tmp_path / "missing", EvalConfig(**FAST_EVAL))
    tmp_path.joinpath("half").mkdir()
    with pytest.raises(ConfigError, match="not a finished run folder"):
        evaluate_run(tmp_path / "half", EvalConfig(**FAST_EVAL))
    with pytest.raises(ConfigError, match="num_samples"):
        evaluate_run(tmp_path / "half", EvalConfig(num_samples=1))
