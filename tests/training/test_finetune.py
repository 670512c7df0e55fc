"""Fine-tuning end to end on the tiny SD-layout pipeline: run folder, diffusers round trip, resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from privdiff.errors import ConfigError
from privdiff.models.lora import ALLOWED_HEADER_KEYS, LORA_WEIGHT_NAME, read_lora
from privdiff.training.run import run_training
from tests.conftest import tiny_run_config


@pytest.fixture(scope="module")
def finished_run(tiny_pipeline_dir: Path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ft")
    # A larger learning rate so that 6 steps move the adapter far enough to change samples visibly.
    return run_training(tiny_run_config(tmp, tiny_pipeline_dir, **{"train.learning_rate": 0.05}),
                        show_progress=False)


def test_run_folder_contract(finished_run: Path):
    for name in ("config.yaml", "summary.json", LORA_WEIGHT_NAME, "membership.json", "samples.png",
                 "history.json"):
        assert (finished_run / name).is_file(), name
    summary = json.loads((finished_run / "summary.json").read_text())
    for key in ("method", "steps", "seed", "dataset", "privdiff_version", "git_commit", "packages",
                "wall_time_s", "metrics", "privacy"):
        assert key in summary, key
    assert summary["method"] == "lora" and summary["steps"] == 6
    assert summary["metrics"] == {} and summary["privacy"] == {}
    assert {"torch", "diffusers", "peft", "opacus"} <= set(summary["packages"])
    assert summary["torch_threads"] == torch.get_num_threads()
    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    assert config["train"]["steps"] == 6 and config["lora"]["rank"] == 8


def test_training_uses_members_only(finished_run: Path):
    manifest = json.loads((finished_run / "membership.json").read_text())
    summary = json.loads((finished_run / "summary.json").read_text())
    members = [i for i, r in manifest["roles"].items() if r.startswith("member")]
    assert summary["dataset"]["num_train_members"] == len(members) == 17  # round(0.52 * 32)


def test_header_metadata_is_minimal(finished_run: Path):
    _, metadata = read_lora(finished_run / LORA_WEIGHT_NAME)
    assert set(metadata) <= set(ALLOWED_HEADER_KEYS)
    header = json.dumps(metadata)
    assert "digit" not in header and "/" not in header.replace("to_out", "")  # no captions, no paths


def _sample(pipe: StableDiffusionPipeline) -> np.ndarray:
    return pipe(["a handwritten digit three"], num_inference_steps=3, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_lora_loads_in_plain_diffusers_and_changes_output(finished_run: Path, tiny_pipeline_dir: Path):
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    before = _sample(pipe)
    pipe.load_lora_weights(str(finished_run), weight_name=LORA_WEIGHT_NAME)
    after = _sample(pipe)
    assert np.abs(after - before).mean() > 1e-3

    # The loaded adapter is the trained one, alpha included: compare UNet outputs directly.
    from privdiff.models.load import load_pipeline
    from privdiff.models.lora import load_lora_into_unet

    ours = load_pipeline(tiny_pipeline_dir)
    load_lora_into_unet(ours.unet, finished_run / LORA_WEIGHT_NAME)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10, 500])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, ctx).sample, ours.unet(x, t, ctx).sample)


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(run_dir / LORA_WEIGHT_NAME), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


class Crash(RuntimeError):
    pass


@pytest.mark.slow
def test_resume_after_crash_matches_uninterrupted_run(tiny_pipeline_dir: Path, tmp_path: Path):
    straight = run_training(tiny_run_config(tmp_path / "a", tiny_pipeline_dir), show_progress=False)

    def crash_at_step_5(step: int, metrics: dict) -> None:
        if step == 5:  # after the checkpoint at step 4, mid-way to the next one
            raise Crash

    cfg = tiny_run_config(tmp_path / "b", tiny_pipeline_dir)
    with pytest.raises(Crash):
        run_training(cfg, show_progress=False, on_step=crash_at_step_5)
    assert not (Path(cfg.output_dir) / "summary.json").exists()
    resumed = run_training(cfg, resume=True, show_progress=False)

    a, b = _adapter(straight), _adapter(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from_step"] == 4
    history_a = json.loads((straight / "history.json").read_text())
    history_b = json.loads((resumed / "history.json").read_text())
    assert [h["loss"] for h in history_a] == [h["loss"] for h in history_b]


def test_existing_run_folder_needs_resume_or_overwrite(finished_run: Path, tiny_pipeline_dir: Path):
    cfg = tiny_run_config(finished_run.parent, tiny_pipeline_dir, output_dir=str(finished_run))
    with pytest.raises(ConfigError, match="--resume .* or --overwrite"):
        run_training(cfg, show_progress=False)


@pytest.mark.slow
def test_resume_refuses_a_changed_config(tiny_pipeline_dir: Path, tmp_path: Path):
    cfg = tiny_run_config(tmp_path, tiny_pipeline_dir, **{"train.steps": 2})
    run_training(cfg, show_progress=False)
    changed = tiny_run_config(tmp_path, tiny_pipeline_dir, **{"train.steps": 2, "lora.rank": 4})
    with pytest.raises(ConfigError, match="config differs"):
        run_training(changed, resume=True, show_progress=False)


def test_overwrite_refuses_foreign_folders(tiny_pipeline_dir: Path, tmp_path: Path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="did not write"):
        run_training(tiny_run_config(tmp_path, tiny_pipeline_dir), overwrite=True, show_progress=False)
    assert (tmp_path / "run" / "thesis.tex").exists()


def test_batch_larger_than_members_is_refused(tiny_pipeline_dir: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="larger than the 17 training members"):
        run_training(tiny_run_config(tmp_path, tiny_pipeline_dir, **{"train.batch_size": 18}),
                     show_progress=False)
    assert not (tmp_path / "run").exists()


def test_out_of_memory_names_the_batch_option_and_the_run_resumes(tiny_pipeline_dir: Path, tmp_path: Path,
                                                                    monkeypatch):
    from privdiff.errors import OutOfMemory, PrivdiffError
    from privdiff.training.methods.lora import LoRA

    real_step, calls = LoRA.step, []

    def step_until_the_device_is_full(self, *args):
        calls.append(1)
        if len(calls) == 5:  # after the checkpoint at step 4
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, *args)

    monkeypatch.setattr(LoRA, "step", step_until_the_device_is_full)
    cfg = tiny_run_config(tmp_path, tiny_pipeline_dir)
    with pytest.raises(OutOfMemory, match="physical_batch_size.*--resume") as caught:
        run_training(cfg, show_progress=False)
    assert isinstance(caught.value, PrivdiffError) and "\n" not in str(caught.value)
    assert torch.load(Path(cfg.output_dir) / "checkpoint.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(LoRA, "step", real_step)
    resumed = run_training(cfg, resume=True, show_progress=False)
    assert json.loads((resumed / "summary.json").read_text())["resumed_from_step"] == 4
