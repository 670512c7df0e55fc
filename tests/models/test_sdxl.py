"""SDXL bases: loading, the packed added conditioning, fine-tuning (lora, dp-lora, smp-lora), sampling,
evaluation, audit and inspection on a tiny SDXL pipeline built in code; the adapter in plain diffusers."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline

from privdiff.audit.run import AuditConfig, run_audit
from privdiff.cli import main
from privdiff.config import DataConfig
from privdiff.data import load_dataset
from privdiff.diffusion import per_example_loss
from privdiff.diffusion.conditioning import (
    NUM_TIME_IDS,
    num_added_rows,
    pack_added_conditioning,
    unpack_added_conditioning,
    uses_added_conditioning,
)
from privdiff.diffusion.task import DiffusionTask, build_task, encode_prompts
from privdiff.dp.per_example import ENGINES
from privdiff.errors import ModelError
from privdiff.evaluation import EvalConfig, evaluate_run
from privdiff.models.load import load_pipeline
from privdiff.models.lora import LORA_WEIGHT_NAME, load_lora_into_unet
from privdiff.models.tiny import TinySDXLConfig, build_tiny_sdxl_pipeline
from privdiff.split.models import load_public_models
from privdiff.training.run import run_training
from tests.adversarial.conftest import refused
from tests.conftest import FAST_EVAL, tiny_run_config
from tests.dp.test_per_example import autograd_reference, draws_for, lora_params

# The SD test model's sizes, in the SDXL layout: two 8-wide text encoders (contexts D = 16), an 8-wide
# pooled embedding, so [pooled, 6 time ids] fits one extra context row.
TEST_SDXL = TinySDXLConfig(vae_channels=(8, 16, 16), unet_channels=(16, 32), cross_attention_dim=16,
                           attention_head_dim=4, text_layers=1)
PROMPTS = ["a handwritten digit three", ""]
DP_FAST = {"train.method": "dp-lora", "dp.target_epsilon": "null", "dp.noise_multiplier": 1.0, "dp.epochs": "null",
           "dp.expected_batch_size": 4, "dp.noise_multiplicity": 2, "dp.physical_batch_size": 3}


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-sdxl") / "pipeline"
    build_tiny_sdxl_pipeline(TEST_SDXL, seed=0).save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl_dir: Path) -> StableDiffusionXLPipeline:
    return load_pipeline(tiny_sdxl_dir)


def finetune(tmp: Path, folder: Path, **overrides: object) -> Path:
    return run_training(tiny_run_config(tmp, folder, **{"train.steps": 4, "train.learning_rate": 0.05,
                                                        "train.caption_dropout": 0.25, **overrides}),
                        show_progress=False)


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl_dir: Path, tmp_path_factory) -> Path:
    """A finished 4-step plain-LoRA run on the tiny SDXL base (caption dropout on)."""
    return finetune(tmp_path_factory.mktemp("sdxl-lora"), tiny_sdxl_dir)


def test_an_sdxl_folder_loads_with_frozen_encoders_and_the_ddpm_schedule(sdxl_pipe):
    assert isinstance(sdxl_pipe, StableDiffusionXLPipeline)
    assert isinstance(sdxl_pipe.scheduler, DDPMScheduler)
    assert uses_added_conditioning(sdxl_pipe.unet)
    for module in (sdxl_pipe.unet, sdxl_pipe.vae, sdxl_pipe.text_encoder, sdxl_pipe.text_encoder_2):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert sdxl_pipe.tokenizer_2.model_max_length == sdxl_pipe.text_encoder_2.config.max_position_embeddings


@pytest.mark.parametrize("kind", ["StableDiffusion3Pipeline", "FluxPipeline", None])
def test_an_unsupported_pipeline_kind_is_refused_in_one_line(kind, tiny_sdxl_dir: Path, tmp_path: Path, capsys):
    folder = tmp_path / "pipeline"
    shutil.copytree(tiny_sdxl_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = kind
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError) as err:
        load_pipeline(folder)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert f"unsupported pipeline kind '{kind}'" in message
    assert "supported: StableDiffusionPipeline, StableDiffusionXLPipeline" in message
    out = tmp_path / "run"
    assert "unsupported pipeline kind" in refused(["finetune", "--pretrained", str(folder), "--out", str(out),
                                                   "--steps", "1", "--num-examples", "8", "--batch-size", "2",
                                                   "--quiet"], capsys)
    assert not out.exists()


def test_split_learning_refuses_an_sdxl_base(tiny_sdxl_dir: Path):
    with pytest.raises(ModelError, match="split learning supports StableDiffusionPipeline bases only"):
        load_public_models(str(tiny_sdxl_dir))


@pytest.mark.parametrize("pooled, width", [(8, 16), (20, 8), (1280, 2048), (10, 16)])
def test_packed_conditioning_round_trips(pooled: int, width: int):
    g = torch.Generator().manual_seed(pooled + width)
    hidden, vector = torch.randn(3, 5, width, generator=g), torch.randn(3, pooled, generator=g)
    ids = torch.tensor([[32.0, 48.0, 0.0, 0.0, 32.0, 48.0]]).expand(3, -1)
    packed = pack_added_conditioning(hidden, vector, ids)
    rows = num_added_rows(pooled, width)
    assert packed.shape == (3, 5 + rows, width) and rows == -(-(pooled + NUM_TIME_IDS) // width)
    assert torch.count_nonzero(packed[:, 5:].reshape(3, -1)[:, pooled + NUM_TIME_IDS:]) == 0  # zero padding
    back, added = unpack_added_conditioning(packed, pooled)
    assert torch.equal(back, hidden) and torch.equal(added["text_embeds"], vector)
    assert torch.equal(added["time_ids"], ids)
    # Rows stay examples: indexing the packed tensor indexes the examples' conditioning.
    _, first = unpack_added_conditioning(packed[[2, 0]], pooled)
    assert torch.equal(first["text_embeds"], vector[[2, 0]])


def test_the_loss_is_the_unet_called_with_diffusers_own_added_conditioning(sdxl_pipe):
    contexts = encode_prompts(sdxl_pipe, PROMPTS, resolution=(32, 32))  # (2, 16 + 1, 16)
    assert contexts.shape == (2, 17, 16)
    hidden, _, pooled, _ = sdxl_pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    ids = sdxl_pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=hidden.dtype,
                                      text_encoder_projection_dim=sdxl_pipe.text_encoder_2.config.projection_dim)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    steps = torch.tensor([10, 700])
    with torch.no_grad():
        ours = per_example_loss(sdxl_pipe.unet, sdxl_pipe.scheduler, latents, contexts, noise, steps)
        prediction = sdxl_pipe.unet(sdxl_pipe.scheduler.add_noise(latents, noise, steps), steps,
                                    encoder_hidden_states=hidden,
                                    added_cond_kwargs={"text_embeds": pooled, "time_ids": ids.expand(2, -1)}).sample
    torch.testing.assert_close(ours, ((prediction - noise) ** 2).mean(dim=(1, 2, 3)), rtol=0, atol=0)


@pytest.fixture(scope="module")
def sdxl_digits(sdxl_pipe) -> DiffusionTask:
    return build_task(sdxl_pipe, load_dataset(DataConfig(name="digits", num_examples=8)))


def test_the_task_packs_the_training_resolution_and_the_empty_prompt(sdxl_digits: DiffusionTask):
    assert sdxl_digits.contexts.shape == (8, 17, 16) and sdxl_digits.null_context.shape == (1, 17, 16)
    _, added = unpack_added_conditioning(sdxl_digits.contexts, 8)
    assert added["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 8
    assert not torch.equal(sdxl_digits.null_context[:, -1], sdxl_digits.contexts[:1, -1])  # its own pooled


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_per_example_gradients_on_sdxl_match_autograd(sdxl_digits: DiffusionTask, engine: str):
    task = DiffusionTask(unet=copy.deepcopy(sdxl_digits.unet), scheduler=sdxl_digits.scheduler,
                         latents=sdxl_digits.latents, contexts=sdxl_digits.contexts,
                         null_context=sdxl_digits.null_context, example_ids=sdxl_digits.example_ids)
    params = lora_params(task, ["to_q", "to_k", "to_v", "to_out.0"])
    draws = draws_for(task, torch.arange(3), 2)
    reference = autograd_reference(task, params, draws)
    computed = ENGINES[engine](task.unet, task.unet, params, task.scheduler)
    computed.compute(draws)
    for name, p in params.items():
        want = reference[name]
        assert torch.linalg.vector_norm(p.grad_sample - want) <= 1e-5 * torch.linalg.vector_norm(want) + 1e-12, name
    computed.close()


def _sample(pipe: StableDiffusionXLPipeline) -> np.ndarray:
    return pipe(["a handwritten digit three"], num_inference_steps=3, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.mark.slow
def test_the_adapter_loads_into_diffusers_sdxl_and_matches_ours(sdxl_run: Path, tiny_sdxl_dir: Path):
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir), local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    before = _sample(pipe)
    pipe.load_lora_weights(str(sdxl_run), weight_name=LORA_WEIGHT_NAME)
    assert np.abs(_sample(pipe) - before).mean() > 1e-3

    ours = load_pipeline(tiny_sdxl_dir)
    load_lora_into_unet(ours.unet, sdxl_run / LORA_WEIGHT_NAME)
    g = torch.Generator().manual_seed(1)
    x, ctx, pooled = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 16, generator=g), torch.randn(2, 8, generator=g)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, torch.tensor([10, 500]), ctx, added_cond_kwargs=added).sample,
                                   ours.unet(x, torch.tensor([10, 500]), ctx, added_cond_kwargs=added).sample)


@pytest.mark.slow
def test_sample_evaluate_audit_and_inspect_an_sdxl_run(sdxl_run: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    shutil.copytree(sdxl_run, run)
    grid = tmp_path / "grid.png"
    assert main(["sample", str(run), "--num-images", "2", "--steps", "2", "--out", str(grid)]) == 0
    assert grid.is_file()

    metrics = evaluate_run(run, EvalConfig(**FAST_EVAL), show_progress=False)
    heldout = [r for r in metrics["records"] if r["metric"] == "heldout_loss"]
    assert heldout and all(np.isfinite(r["value"]) for r in heldout)

    audit = run_audit(run, AuditConfig(attacks=["loss", "pia", "secmi", "sima"], bootstrap=20), show_progress=False)
    assert set(audit["attacks"]) == {"loss", "pia", "secmi", "sima"}
    scores = np.load(run / "audit" / "scores.npz")
    assert all(np.isfinite(scores[name]).all() for name in audit["attacks"])

    assert main(["inspect", str(run / LORA_WEIGHT_NAME), "--scrub", str(tmp_path / "clean.safetensors")]) == 0
    StableDiffusionXLPipeline.lora_state_dict(str(tmp_path / "clean.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("method, overrides", [
    ("dp-lora", DP_FAST),
    ("smp-lora", {"train.method": "smp-lora", "smp.proxy_lr": 1e-3, "smp.probe_every": 2}),
])
def test_private_methods_fine_tune_an_sdxl_base(method: str, overrides: dict, tiny_sdxl_dir: Path, tmp_path: Path):
    run = finetune(tmp_path, tiny_sdxl_dir, **overrides)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and np.isfinite(summary["final_loss"])
    assert (run / LORA_WEIGHT_NAME).is_file() and (run / "samples.png").is_file()
    ours = load_pipeline(tiny_sdxl_dir)
    load_lora_into_unet(ours.unet, run / LORA_WEIGHT_NAME)


def test_an_sdxl_base_in_bf16_encodes_to_fp32_and_gives_the_fp32_loss(tiny_sdxl_dir: Path, sdxl_digits: DiffusionTask):
    low = build_task(load_pipeline(tiny_sdxl_dir, dtype=torch.bfloat16),
                     load_dataset(DataConfig(name="digits", num_examples=len(sdxl_digits.example_ids))))
    assert low.unet.dtype == torch.bfloat16
    assert low.latents.dtype == low.contexts.dtype == torch.float32 and low.contexts.shape == sdxl_digits.contexts.shape
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(sdxl_digits.latents.shape, generator=g)
    t = torch.randint(0, 1000, (len(noise),), generator=g)
    losses = [per_example_loss(task.unet, task.scheduler, task.latents, task.contexts, noise, t)
              for task in (sdxl_digits, low)]
    assert losses[1].dtype == torch.float32 and torch.allclose(losses[1], losses[0], rtol=0.05, atol=1e-3)
