"""The whole `privdiff attack weights` run on the tiny test model: every output, the report card,
and attacking one file with the trained encoder (plumbing; the slow test measures the attack)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from privdiff.cli import main
from privdiff.report.collect import collect
from privdiff.report.html import render


@pytest.fixture(scope="module")
def tiny_attack_run(tiny_pipeline_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("weights") / "run"
    settings = [f"base_model={tiny_pipeline_dir}", "recipe.steps=4", "recipe.prior_images=2",
                "recipe.text_encoder_rank=4",
                "training.budget_steps=8", "eval.generation.inference_steps=2", "eval.generation.images=2",
                "eval.grid_victims=2", "eval.baseline_victims=1", "eval.baseline_iterations=2"]
    code = main(["attack", "weights", "--out", str(out), "--victims", "2", "--quiet",
                 "--defence", "prune=0.9", "--defence", "rank=1", "--defence", "weight-noise=1",
                 "--defence", "dp=8", "--adaptive", *[a for s in settings for a in ("--set", s)]])
    assert code == 0
    return out


def test_the_run_writes_results_encoders_victims_and_figures(tiny_attack_run):
    out = tiny_attack_run
    result = json.loads((out / "attack.json").read_text())
    assert result["kind"] == "weights-attack" and result["aggregate"]["victims"] == 2
    for condition in ("attack", "true_prompt", "random_embedding", "base"):
        entry = result["aggregate"][condition]["identity_similarity"]
        assert 0 <= entry["ci"][0] <= entry["value"] <= entry["ci"][1] <= 1
    assert result["gallery_size"] == 180 and result["metadata_attack"] == {"recovered": 0, "of": 2, "keys": {}}
    assert result["encoder"]["pairs"] == 8 and result["encoder"]["finetune_steps"] == 8
    assert result["ablation"]["encoder"]["pairs"] == 2  # two full 4-step runs, one end-of-run pair each
    assert result["update_matching"]["aggregate"]["dummy_images"]["identity_similarity"]["value"] > 0
    assert result["timings"]["encoder_pairs_per_s"] > 0 and result["run"]["packages"]["torch"]
    points = {(p["defence"], p["knob"]): p for p in result["defences"]["points"]}
    assert set(points) == {("none", None), ("prune", 0.9), ("rank", 1.0), ("weight-noise", 1.0), ("dp", 8.0)}
    assert "adaptive_attack" in points[("prune", 0.9)] and "adaptive_attack" not in points[("dp", 8.0)]
    assert "group privacy" in points[("dp", 8.0)]["group_privacy_note"]
    assert json.loads((out / "defences.json").read_text()) == result["defences"]
    assert result["defences"]["victims"] == 2
    for name in ("attack_grid.png", "defence_curve.png", "config.yaml", "encoder/encoder.safetensors",
                 "encoder/encoder.json", "encoder/encoder_log.jsonl", "encoder-ablation/encoder.json",
                 "encoder-adaptive-prune-0.9/encoder.json"):
        assert (out / name).is_file(), name
    victims = sorted((out / "victims").glob("*.safetensors"))
    dp_victims = sorted((out / "victims" / "dp-8").glob("*.safetensors"))
    assert len(victims) == 2 and len(dp_victims) == 2
    # The recipe's text-encoder adapter is in each victim's file; DP victims never get one.
    assert any(k.startswith("text_encoder.") for k in load_file(str(victims[0])))
    assert not any(k.startswith("text_encoder.") for k in load_file(str(dp_victims[0])))


def test_the_report_card_shows_the_weights_attack(tiny_attack_run):
    report = collect([tiny_attack_run])
    assert report["runs"] == [] and len(report["weights_attacks"]) == 1
    page = render(report)
    assert "Shared LoRA weights" in page and "random embedding (lower bound)" in page
    assert "Defences: utility against leak" in page and page.count("<img") >= 2
    assert "2 victims. Lower bound (random embedding)" in page


@pytest.mark.slow
def test_one_adapter_is_attacked_with_the_trained_encoder(tiny_attack_run, tmp_path, capsys):
    adapter = sorted((tiny_attack_run / "victims").glob("*.safetensors"))[0]
    out = tmp_path / "one"
    assert main(["attack", "weights", "--adapter", str(adapter), "--encoder", str(tiny_attack_run / "encoder"),
                 "--out", str(out)]) == 0
    result = json.loads((out / "adapter_attack.json").read_text())
    assert result["images"] == 2 and result["header"]["leaks"] is False
    assert (out / "adapter_attack.png").is_file()
    # An adapter of another layout is refused in one line, before anything is written.
    tensors = load_file(str(adapter))
    other = tmp_path / "other.safetensors"
    unet_keys = sorted(k for k in tensors if k.startswith("unet."))
    save_file({k: v for k, v in tensors.items() if k not in unet_keys[:4]}, str(other))
    assert main(["attack", "weights", "--adapter", str(other), "--encoder", str(tiny_attack_run / "encoder"),
                 "--out", str(tmp_path / "two")]) == 2
    err = capsys.readouterr().err
    assert "matrices" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "two").exists()
