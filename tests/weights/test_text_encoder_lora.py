"""The victims' optional text-encoder LoRA (weights-attack.md §4): trained with the UNet's, one file
that diffusers loads whole, ignored by the encoder's reader, carried through defences."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

from privdiff.data.identities import attack_split
from privdiff.errors import ConfigError, ModelError
from privdiff.models.load import load_pipeline
from privdiff.models.lora import load_lora_into_text_encoder, read_lora, save_lora
from privdiff.models.generation import sample_to_file
from privdiff.diffusion.task import encode_prompts
from privdiff.weights.config import WeightsAttackConfig
from privdiff.defences import defend_file
from privdiff.weights.scoring import victim_model
from privdiff.weights.finetune import FinetuneBench, FinetuneRecipe
from privdiff.models.lora_math import read_text_encoder_lora, read_unet_lora

SHADOWS, VICTIMS = attack_split()
RECIPE = FinetuneRecipe(steps=3, prior_images=2, text_encoder_rank=4, text_encoder_alpha=4.0)


@pytest.fixture(scope="module")
def bench(tiny_pipeline_dir) -> FinetuneBench:
    return FinetuneBench(load_pipeline(tiny_pipeline_dir), RECIPE, seed=0)


@pytest.fixture(scope="module")
def fine_tuned(bench):
    base_text_encoder = copy.deepcopy(bench.pipe.text_encoder.state_dict())
    model = bench.finetune(VICTIMS[0])
    return model, base_text_encoder


@pytest.fixture(scope="module")
def victim_file(bench, fine_tuned, tmp_path_factory):
    return bench.save_adapter(fine_tuned[0], tmp_path_factory.mktemp("te") / "victim.safetensors")


def _fresh_pipeline(bench: FinetuneBench) -> StableDiffusionPipeline:
    """The base pipeline with its own UNet and text encoder, for `load_lora_weights` to load into."""
    return StableDiffusionPipeline(**{**bench.pipe.components, "unet": copy.deepcopy(bench.pipe.unet),
                                      "text_encoder": copy.deepcopy(bench.pipe.text_encoder)},
                                   requires_safety_checker=False)


def _prompt_states(pipe, text_encoder, prompt: str) -> torch.Tensor:
    return encode_prompts(pipe, [prompt], text_encoder=text_encoder)


def test_the_text_encoder_adapter_trains_and_the_base_stays_frozen(bench, fine_tuned):
    model, base_state = fine_tuned
    assert model.text_encoder is not None and model.text_encoder is not bench.pipe.text_encoder
    assert all(torch.equal(v, bench.pipe.text_encoder.state_dict()[k]) for k, v in base_state.items())
    ups = [p for n, p in model.text_encoder.named_parameters() if "lora_B" in n]
    assert len(ups) == 2 * bench.pipe.text_encoder.config.num_hidden_layers  # q_proj and v_proj per layer
    assert all(p.abs().sum() > 0 for p in ups)  # B starts at zero: every one was trained
    prompt = bench.recipe.prompt(VICTIMS[0])
    moved = _prompt_states(bench.pipe, model.text_encoder, prompt) - _prompt_states(bench.pipe, None, prompt)
    assert moved.abs().max() > 1e-4


def test_one_file_holds_both_adapters_and_diffusers_loads_it_whole(bench, fine_tuned, victim_file):
    model, _ = fine_tuned
    tensors, _ = read_lora(victim_file)
    assert any(k.startswith("text_encoder.") for k in tensors) and any(k.startswith("unet.") for k in tensors)
    pipe = _fresh_pipeline(bench)
    pipe.load_lora_weights(str(victim_file))
    prompt = bench.recipe.prompt(VICTIMS[0])
    want = _prompt_states(bench.pipe, model.text_encoder, prompt)
    torch.testing.assert_close(_prompt_states(bench.pipe, pipe.text_encoder, prompt), want)
    # privdiff's own reader rebuilds the same victim model.
    rebuilt = victim_model(bench, victim_file)
    torch.testing.assert_close(_prompt_states(bench.pipe, rebuilt.text_encoder, prompt), want)
    latents = torch.randn(1, *bench.latent_shape(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.unet(latents, torch.tensor([10]), encoder_hidden_states=want).sample
        theirs = pipe.unet(latents, torch.tensor([10]), encoder_hidden_states=want).sample
    torch.testing.assert_close(theirs, ours)


def test_the_encoder_reads_the_same_unet_layers_with_or_without_the_text_encoder(fine_tuned, victim_file, bench,
                                                                                   tmp_path):
    unet_only = tmp_path / "unet-only.safetensors"
    save_lora(unet_only, fine_tuned[0].unet, bench.recipe.lora_config())
    both, alone = read_unet_lora(victim_file), read_unet_lora(unet_only)
    assert [layer.name for layer in both] == [layer.name for layer in alone]
    assert all(torch.equal(a.down, b.down) and torch.equal(a.up, b.up) and a.alpha == b.alpha
               for a, b in zip(both, alone))
    assert read_text_encoder_lora(unet_only) == []
    text_layers = read_text_encoder_lora(victim_file)
    assert len(text_layers) == 2 * bench.pipe.text_encoder.config.num_hidden_layers
    assert {layer.alpha for layer in text_layers} == {4.0}
    assert not load_lora_into_text_encoder(copy.deepcopy(bench.pipe.text_encoder), unet_only)


@pytest.mark.parametrize("defence, knob", [("prune", 0.5), ("rank", 1), ("weight-noise", 1.0)])
def test_defences_defend_the_text_encoder_adapter_and_keep_it(bench, victim_file, tmp_path, defence, knob):
    out = defend_file(victim_file, tmp_path / "defended.safetensors", defence, knob, seed=0)
    before, after = read_text_encoder_lora(victim_file), read_text_encoder_lora(out)
    assert [layer.name for layer in after] == [layer.name for layer in before]
    assert all(not torch.allclose(a.delta_weight(), b.delta_weight()) for a, b in zip(after, before))
    if defence == "prune":
        for layer in after:
            assert (layer.down == 0).float().mean() >= 0.5 and (layer.up == 0).float().mean() >= 0.5
    if defence == "rank":
        assert all(torch.linalg.matrix_rank(layer.delta_weight()) <= 1 for layer in after)
    pipe = _fresh_pipeline(bench)
    pipe.load_lora_weights(str(out))  # the defended file still loads whole
    prompt = bench.recipe.prompt(VICTIMS[0])
    rebuilt = victim_model(bench, out)
    torch.testing.assert_close(_prompt_states(bench.pipe, pipe.text_encoder, prompt),
                               _prompt_states(bench.pipe, rebuilt.text_encoder, prompt))


def test_dp_victims_and_rank_zero_get_no_text_encoder_adapter(bench, tmp_path):
    plain = FinetuneBench(bench.pipe, replace(RECIPE, text_encoder_rank=0), seed=0)
    model = plain.finetune(VICTIMS[1])
    assert model.text_encoder is None
    tensors, _ = read_lora(plain.save_adapter(model, tmp_path / "plain.safetensors"))
    assert not any(k.startswith("text_encoder.") for k in tensors)
    assert bench.finetune(VICTIMS[1], 2, dp_epsilon=8.0).text_encoder is None


def test_a_text_encoder_adapter_that_does_not_fit_is_refused(bench, victim_file, tmp_path):
    tensors, metadata = read_lora(victim_file)
    key = next(k for k in tensors if k.startswith("text_encoder.") and k.endswith("down.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(ModelError, match="does not match this text encoder"):
        load_lora_into_text_encoder(copy.deepcopy(bench.pipe.text_encoder), bad)


def test_a_negative_text_encoder_rank_is_refused():
    with pytest.raises(ConfigError, match="text_encoder_rank"):
        WeightsAttackConfig(recipe=replace(RECIPE, text_encoder_rank=-1)).validate()


def test_privdiff_sample_applies_the_text_encoder_adapter(bench, victim_file, tiny_pipeline_dir, tmp_path):
    tensors, metadata = read_lora(victim_file)
    unet_only = tmp_path / "unet-only.safetensors"
    save_file({k: v for k, v in tensors.items() if k.startswith("unet.")}, str(unet_only), metadata=metadata)
    grids = []
    for lora in (victim_file, unet_only):
        out = sample_to_file(run_dir=None, lora=lora, pretrained=str(tiny_pipeline_dir),
                             prompts=[bench.recipe.prompt(VICTIMS[0])], num_images=1, steps=2, scheduler="ddim",
                             guidance_scale=3.0, seed=0, out=tmp_path / f"{lora.stem}.png")
        grids.append(torch.tensor(list(Image.open(out).getdata()), dtype=torch.float32))
    assert not torch.equal(grids[0], grids[1])
