"""Post-hoc defences on shared LoRA files (weights-attack.md §8, §11.6): what each does, and that the files still load."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from privdiff.cli import main
from privdiff.errors import ConfigError, ModelError
from privdiff.models.inspect import read_header
from privdiff.models.lora import load_lora_into_unet, read_lora
from privdiff.defences import (DEFENCES, add_weight_noise, defend_file, defend_layers, prune_by_magnitude,
                                       truncate_rank)
from privdiff.models.lora_math import LoRALayer, read_unet_lora

ALL_SETTINGS = [(name, knob) for name, defence in DEFENCES.items() for knob in defence.knobs]


def _random_layers(rank: int = 8, d: int = 40, seed: int = 0) -> list[LoRALayer]:
    generator = torch.Generator().manual_seed(seed)
    return [LoRALayer(f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_{w}",
                      torch.randn(rank, d, generator=generator), 0.1 * torch.randn(d + 8, rank, generator=generator),
                      alpha=4.0) for w in ("q", "v")]


def test_the_registry_holds_the_spec_knobs():
    assert DEFENCES["weight-noise"].knobs == (0.1, 0.3, 1.0, 3.0)
    assert DEFENCES["prune"].knobs == (0.5, 0.9, 0.99)
    assert DEFENCES["rank"].knobs == (1, 2, "r/2")


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_pruning_zeroes_the_requested_fraction_of_smallest_entries(layers, fraction):
    originals = layers + _random_layers()
    for before, after in zip(originals, prune_by_magnitude(originals, fraction)):
        for old, new in ((before.down, after.down), (before.up, after.up)):
            zeroed = new == 0
            assert abs(int(zeroed.sum()) - fraction * old.numel()) <= 1, before.name
            assert torch.equal(new[~zeroed], old[~zeroed])  # the rest is untouched
            if zeroed.any() and (~zeroed).any():
                assert old[zeroed].abs().max() <= old[~zeroed].abs().min()


@pytest.mark.parametrize("keep", [1, 2, "r/2"])
def test_rank_truncation_gives_the_best_rank_k_approximation(layers, keep):
    for before, after in zip(layers, truncate_rank(layers, keep)):
        k = before.rank // 2 if keep == "r/2" else keep
        delta = before.delta_weight(torch.float64)
        u, sigma, vh = torch.linalg.svd(delta)
        best = u[:, :k] @ torch.diag(sigma[:k]) @ vh[:k]
        truncated = after.delta_weight(torch.float64)
        assert torch.linalg.matrix_rank(truncated, rtol=1e-5) <= k
        assert torch.allclose(truncated, best, atol=1e-5 * sigma[0].item()), before.name
        assert after.up.shape == before.up.shape and after.down.shape == before.down.shape
        assert after.alpha == before.alpha


@pytest.mark.parametrize("rho", DEFENCES["weight-noise"].knobs)
def test_weight_noise_has_the_target_std_per_tensor(rho):
    # 160k entries per tensor: the empirical std is within ~0.5 % of its target (5 % is ~28 standard errors).
    generator = torch.Generator().manual_seed(0)
    big = LoRALayer("mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
                    torch.randn(8, 20_000, generator=generator), 0.01 * torch.randn(20_000, 8, generator=generator),
                    alpha=8.0)
    noisy = add_weight_noise([big], rho, torch.Generator().manual_seed(1))[0]
    for old, new in ((big.down, noisy.down), (big.up, noisy.up)):
        target = rho * old.pow(2).mean().sqrt()
        noise = new - old
        assert abs(noise.std() / target - 1) < 0.05
        assert abs(noise.mean()) < 0.05 * target


def test_weight_noise_is_reproducible_from_the_generator(layers):
    a = add_weight_noise(layers, 0.3, torch.Generator().manual_seed(5))
    b = add_weight_noise(layers, 0.3, torch.Generator().manual_seed(5))
    c = add_weight_noise(layers, 0.3, torch.Generator().manual_seed(6))
    assert all(torch.equal(x.down, y.down) and torch.equal(x.up, y.up) for x, y in zip(a, b))
    assert not torch.equal(a[0].down, c[0].down)


def test_defend_layers_rejects_unknown_defences_and_bad_knobs(layers):
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError, match="unknown defence"):
        defend_layers(layers, "blur", 1, generator)
    for defence, knob in (("prune", 1.5), ("prune", "lots"), ("weight-noise", -1), ("rank", 0), ("rank", 9),
                          ("rank", 1.5), ("rank", "r/3")):
        with pytest.raises(ConfigError):
            defend_layers(layers, defence, knob, generator)


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir), safety_checker=None)


@pytest.fixture(scope="module")
def bare_unet(tiny_pipeline_dir):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(tiny_pipeline_dir / "unet"))


@pytest.mark.parametrize(("defence", "knob"), ALL_SETTINGS)
def test_every_defended_file_loads_and_is_clean(adapter, tmp_path, pipe, bare_unet, defence, knob):
    path = defend_file(adapter, tmp_path / "defended.safetensors", defence, knob, seed=0)
    expected = defend_layers(read_unet_lora(adapter), defence, knob, torch.Generator().manual_seed(0))
    pipe.load_lora_weights(str(path), adapter_name="defended")
    try:
        unet = copy.deepcopy(bare_unet)
        load_lora_into_unet(unet, path)
        for layer in expected:
            for model in (pipe.unet, unet):
                module = model.get_submodule(layer.name)
                name = next(iter(module.lora_A))
                assert torch.equal(module.lora_A[name].weight, layer.down), layer.name
                assert torch.equal(module.lora_B[name].weight, layer.up), layer.name
                assert module.scaling[name] == pytest.approx(layer.scale)
    finally:
        pipe.unload_lora_weights()
    assert main(["inspect", str(path)]) == 0
    _, metadata, _ = read_header(path)
    assert metadata["privdiff.defence"] == defence and metadata["privdiff.defence.knob"] == str(knob)


def test_defend_file_keeps_only_allow_listed_header_keys(adapter, tmp_path):
    tensors, metadata = read_lora(adapter)
    leaky = tmp_path / "leaky.safetensors"
    save_file(tensors, str(leaky), metadata={**metadata, "privdiff.dp.epsilon": "8.0", "ss_seed": "1234",
                                             "ss_tag_frequency": json.dumps({"sks person": 12})})
    out = defend_file(leaky, tmp_path / "out.safetensors", "prune", 0.5)
    _, header, _ = read_header(out)
    assert set(header) == {"format", "lora_adapter_metadata", "privdiff.dp.epsilon", "privdiff.defence",
                           "privdiff.defence.knob"}
    assert header["privdiff.dp.epsilon"] == "8.0"


def test_defend_file_refuses_to_write_in_place_and_without_a_seed_draws_fresh_noise(adapter, tmp_path):
    with pytest.raises(ModelError, match="other than the input"):
        defend_file(adapter, adapter, "prune", 0.5)
    first = read_unet_lora(defend_file(adapter, tmp_path / "a.safetensors", "weight-noise", 0.1))
    second = read_unet_lora(defend_file(adapter, tmp_path / "b.safetensors", "weight-noise", 0.1))
    assert not torch.equal(first[0].down, second[0].down)


def test_the_config_choices_name_exactly_the_registered_defences():
    """`training.defence` is a Literal (checked on load); it must list what the registry applies."""
    from typing import get_args

    from privdiff.weights.paradigm import PostHocDefence

    assert set(get_args(PostHocDefence)) == set(DEFENCES)
