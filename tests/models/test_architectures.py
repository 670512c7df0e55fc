import math
from pathlib import Path

import pytest
import torch

from privdiff.config import load_config
from privdiff.diffusion.task import DiffusionTask
from privdiff.errors import ConfigError
from privdiff.models.architectures import (
    ARCHITECTURES,
    ARCHITECTURES_DIR,
    architecture_components,
    build_architecture_pipeline,
    build_architecture_tokenizer,
    build_component,
    read_architecture_config,
)
from privdiff.models.lora import lora_state_dict, read_lora, save_lora
from privdiff.seeding import generator
from privdiff.training.loop import make_batch
from privdiff.training.methods import DPLoRA

# Parameter counts of the public checkpoints (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-xl-base-1.0): the shipped configs must rebuild exactly these shapes.
PUBLIC_PARAMETER_COUNTS = {
    ("sd15", "unet"): 859_520_964,
    ("sd15", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "vae"): 83_653_863,
    ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,
}


def test_shipped_configs_rebuild_the_public_parameter_counts():
    built = {(name, c): sum(p.numel() for p in build_component(name, c, device="meta").parameters())
             for name in ARCHITECTURES for c in architecture_components(name)}
    assert built == PUBLIC_PARAMETER_COUNTS


def test_shipped_configs_state_the_documented_sizes():
    sd15, sdxl = read_architecture_config("sd15", "unet"), read_architecture_config("sdxl", "unet")
    assert (sd15["block_out_channels"], sd15["cross_attention_dim"], sd15["sample_size"]) == ([320, 640, 1280, 1280], 768, 64)
    assert (sdxl["transformer_layers_per_block"], sdxl["cross_attention_dim"], sdxl["addition_embed_type"]) == (
        [1, 2, 10], 2048, "text_time")
    assert read_architecture_config("sd15", "vae")["scaling_factor"] == 0.18215
    assert read_architecture_config("sdxl", "vae")["scaling_factor"] == 0.13025
    assert read_architecture_config("sdxl", "scheduler")["beta_schedule"] == "scaled_linear"


def test_text_encoders_use_the_code_built_tokenizers_special_tokens():
    tokenizer = build_architecture_tokenizer()
    encoder = build_component("sdxl", "text_encoder_2", device="meta")
    assert tokenizer.model_max_length == encoder.config.max_position_embeddings == 77
    assert (encoder.config.bos_token_id, encoder.config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert len(tokenizer) <= encoder.config.vocab_size  # the real 49408-row embedding is kept


def test_unknown_architecture_or_component_is_one_line_listing_the_known_ones():
    with pytest.raises(ConfigError, match="unknown architecture 'sd3' .*sd15, sdxl"):
        build_component("sd3", "unet", device="meta")
    with pytest.raises(ConfigError, match="no component 'text_encoder_2'"):
        read_architecture_config("sd15", "text_encoder_2")


def test_architecture_configs_are_package_data():
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert 'privdiff = ["assets/**/*"' in pyproject  # the glob that ships every file under assets/
    assert ARCHITECTURES_DIR.is_relative_to(Path(__import__("privdiff").__file__).parent)


@pytest.mark.slow
def test_weights_are_seeded_and_independent_of_dtype():
    first, again = build_component("sd15", "vae", seed=3), build_component("sd15", "vae", seed=3)
    other, low = build_component("sd15", "vae", seed=4), build_component("sd15", "vae", seed=3, dtype=torch.bfloat16)
    pairs = list(zip(first.parameters(), again.parameters(), other.parameters(), low.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b, _, _ in pairs)
    assert not all(torch.equal(a, c) for a, _, c, _ in pairs)
    assert all(torch.equal(a.bfloat16(), d) for a, _, _, d in pairs)
    assert not any(p.requires_grad for p in first.parameters()) and not first.training


@pytest.mark.long
def test_sd15_size_dp_lora_step_exports_an_adapter_that_diffusers_loads(tmp_path: Path):
    """The real SD-1.5 shapes end to end (about 2 minutes and 8 GB on 2 cores): one DP-LoRA step on
    512-px latents, `save_lora`, then `StableDiffusionPipeline.load_lora_weights` into the bare pipeline."""
    pipe = build_architecture_pipeline("sd15", seed=0)
    g = generator(0, "test-architectures")
    task = DiffusionTask(unet=pipe.unet, scheduler=pipe.scheduler, latents=torch.randn(4, 4, 64, 64, generator=g),
                         contexts=torch.randn(4, 77, 768, generator=g), null_context=torch.zeros(1, 77, 768),
                         example_ids=["a", "b", "c", "d"])
    config = load_config(None, ["train.method=dp-lora", "dp.noise_multiplicity=1", "dp.physical_batch_size=1",
                                "dp.expected_batch_size=1", "dp.target_epsilon=null", "dp.noise_multiplier=1.0",
                                "dp.epochs=null", "train.steps=1"])
    method = DPLoRA(config)
    method.check_inputs(task.num_examples, pipe.unet)
    method.prepare(task)
    rng = generator(0, "test-architectures", "step")
    method.batch_indices(0, task.num_examples, rng)  # the step's keys; one example, whatever Poisson drew
    metrics = method.step(task, make_batch(task, torch.tensor([0]), 0.0, rng), rng)
    method.finish(task)
    assert math.isfinite(metrics["loss"]) and metrics["batch_size"] >= 0

    path = tmp_path / "adapter.safetensors"
    save_lora(path, pipe.unet, config.lora, method.adapter_metadata())
    exported = {k.removeprefix("unet."): v for k, v in read_lora(path)[0].items()}
    assert read_lora(path)[1]["privdiff.dp.steps"] == "1"
    pipe.unload_lora_weights()  # the bare base: LoRA training never changes it
    x, t, c = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        bare = pipe.unet(x, t, encoder_hidden_states=c).sample
        pipe.load_lora_weights(str(path), adapter_name="default")
        adapted = pipe.unet(x, t, encoder_hidden_states=c).sample
    loaded = lora_state_dict(pipe.unet)
    assert loaded.keys() == exported.keys() and len(loaded) == 256  # A and B of 4 projections x 2 attentions x 16 blocks
    assert all(torch.equal(loaded[k], v) for k, v in exported.items())
    assert not torch.equal(bare, adapted)  # the noisy DP update is in the loaded adapter
