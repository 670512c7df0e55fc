"""The weights attack's shadow farm (issue 32): the encoder trained from a farm's folders equals the one
trained on fine-tunes done in place, a stopped farm refits only its unfinished runs, and 1 and 2
torchrun processes give the same attack.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from privdiff.data.identities import attack_split
from privdiff.errors import ConfigError
from privdiff.models.load import load_pipeline
from privdiff.runs.farm import FINISHED_MARKER
from privdiff.weights.finetune import FinetuneBench, FinetuneRecipe
from privdiff.weights.paradigm import EncoderTrainer, EncoderTrainingConfig
from privdiff.weights.shadow_runs import PAIRS_FILE, farm_shadow_runs, plan_shadow_runs
from tests.conftest import without_keys

SHADOWS = attack_split()[0][:3]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def bench(tiny_pipeline_dir) -> FinetuneBench:
    torch.manual_seed(0)
    return FinetuneBench(load_pipeline(tiny_pipeline_dir), FinetuneRecipe(steps=3, prior_images=1), seed=0)


def farm(bench: FinetuneBench, folder: Path, training: EncoderTrainingConfig, settings: dict | None = None):
    runs = plan_shadow_runs(SHADOWS, bench.recipe.steps, training.budget_steps, every_step=True, seed=training.seed)
    return runs, farm_shadow_runs(bench, folder, runs, every_step=True, settings=settings or {"seed": 0},
                                  show_progress=False)


@pytest.mark.slow
def test_an_encoder_trained_from_a_farm_equals_one_trained_on_fine_tunes_in_place(bench, tmp_path):
    training = EncoderTrainingConfig(budget_steps=7, concurrent_runs=2, pair_batch=3)
    runs, source = farm(bench, tmp_path / "farm", training)
    assert len(runs) >= 3 and sum(run.steps for run in runs) == 7
    here, farmed = EncoderTrainer(bench, training, SHADOWS), EncoderTrainer(bench, training, SHADOWS)
    here.train(show_progress=False)
    farmed.train(show_progress=False, source=source)
    assert here.runs == farmed.runs and [u["loss"] for u in here.updates] == [u["loss"] for u in farmed.updates]
    assert all(torch.equal(a, b) for a, b in zip(here.params, farmed.params, strict=True))


def test_a_stopped_farm_refits_only_its_unfinished_runs_and_refuses_other_settings(bench, tmp_path):
    training = EncoderTrainingConfig(budget_steps=5)
    folder = tmp_path / "farm"
    runs, source = farm(bench, folder, training)
    before = {run.index: source(run)[0] for run in runs}
    files = [folder / f"run-{run.index:05d}" / PAIRS_FILE for run in runs]
    mtimes = [f.stat().st_mtime_ns for f in files]
    # Stopped while writing run 1: its pairs file may be there, its marker (written last) is not.
    (files[1].parent / FINISHED_MARKER).unlink()
    _, source = farm(bench, folder, training)
    assert [f.stat().st_mtime_ns for f in files][:1] + [f.stat().st_mtime_ns for f in files][2:] == \
        mtimes[:1] + mtimes[2:]  # the finished runs were not fine-tuned again
    assert files[1].stat().st_mtime_ns != mtimes[1] and (files[1].parent / FINISHED_MARKER).exists()
    again = source(runs[1])[0]
    assert [p.step for p in again] == [p.step for p in before[1]]
    assert all(torch.equal(a.up, b.up) for p, q in zip(again, before[1]) for a, b in zip(p.layers, q.layers))
    with pytest.raises(ConfigError, match="other settings"):
        farm(bench, folder, training, settings={"seed": 1})


# Timings, the run record and the process count differ between any two runs.
UNSTABLE = {"timings", "run", "wall_time_s", "encoder_seconds", "finetune_seconds", "pairs_per_s",
            "encoder_pairs_per_s", "finetune_s_per_step"}


def stable(value):
    return without_keys(value, UNSTABLE)


def farm_attack(out: Path, nproc: int, pipeline: Path, *extra: str) -> dict:
    settings = [f"base_model={pipeline}", "recipe.steps=2", "recipe.prior_images=1", "training.budget_steps=5",
                "training.concurrent_runs=2", "eval.ablation=false", "eval.baseline_victims=0",
                "eval.grid_victims=1", "eval.generation.images=1", "eval.generation.inference_steps=1"]
    command = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "privdiff", "attack", "weights",
               "--out", str(out), "--victims", "1", "--quiet", "--distributed", *extra,
               *[a for s in settings for a in ("--set", s)]]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "attack.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this python")
def test_one_and_two_processes_give_the_same_attack_and_a_stopped_farm_keeps_its_finished_runs(
        tiny_pipeline_dir, tmp_path):
    one = farm_attack(tmp_path / "one", 1, tiny_pipeline_dir)
    two = farm_attack(tmp_path / "two", 2, tiny_pipeline_dir)
    assert two["timings"]["shadow_farm_processes"] == 2 and one["encoder"]["shadow_runs"] >= 3
    assert stable(two) == stable(one)

    runs = sorted((tmp_path / "two" / "shadows" / "every-step").glob("run-*"))
    mtimes = [(run / PAIRS_FILE).stat().st_mtime_ns for run in runs]
    (runs[1] / FINISHED_MARKER).unlink()
    again = farm_attack(tmp_path / "two", 2, tiny_pipeline_dir, "--overwrite")
    after = [(run / PAIRS_FILE).stat().st_mtime_ns for run in runs]
    assert [a == b for a, b in zip(after, mtimes)] == [k != 1 for k in range(len(runs))]
    assert stable(again) == stable(one)
