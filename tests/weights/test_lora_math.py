"""Reading UNet LoRA files in diffusers, peft and kohya form; writing them; SVD re-factoring (weights-attack.md §5, §11.2-3)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from privdiff.errors import ConfigError, ModelError
from privdiff.models.lora import read_lora
from privdiff.models.lora_math import (LoRALayer, canonical_layers, layers_from_state_dict, read_unet_lora,
                                        refactor, write_kohya, write_unet_lora)


def assert_same_layers(got: list[LoRALayer], expected: list[LoRALayer]) -> None:
    assert [layer.name for layer in got] == [layer.name for layer in expected]
    for a, b in zip(got, expected):
        assert torch.equal(a.down, b.down) and torch.equal(a.up, b.up), a.name
        assert a.alpha == b.alpha, a.name


def _peft_tensors(adapter: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The adapter as peft's `save_pretrained` names it: `base_model.model.<module>.lora_A.weight`."""
    tensors, _ = read_lora(adapter)
    return {prefix + k.removeprefix("unet.").replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v
            for k, v in tensors.items()}


def _kohya_tensors(adapter: Path, alpha: float) -> dict[str, torch.Tensor]:
    """The adapter as kohya sd-scripts names it, built by hand (independent of `write_kohya`)."""
    tensors, _ = read_lora(adapter)
    out = {}
    for key, value in tensors.items():
        module, role = key.removeprefix("unet.").rsplit(".lora.", 1)
        stem = "lora_unet_" + module.replace(".", "_")
        out[f"{stem}.lora_{role.removesuffix('.weight')}.weight"] = value
        out[f"{stem}.alpha"] = torch.tensor(alpha)
    return out


def test_the_diffusers_file_gives_sorted_layers_with_its_rank_and_alpha(adapter, layers):
    tensors, metadata = read_lora(adapter)
    config = json.loads(metadata["lora_adapter_metadata"])
    assert len(layers) == sum(".lora.down." in k for k in tensors)
    assert [layer.name for layer in layers] == sorted(layer.name for layer in layers)
    first = layers[0]
    assert first.name == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    assert torch.equal(first.down, tensors[f"unet.{first.name}.lora.down.weight"])
    assert torch.equal(first.up, tensors[f"unet.{first.name}.lora.up.weight"])
    assert {layer.rank for layer in layers} == {config["unet.r"]}
    assert {layer.alpha for layer in layers} == {config["unet.lora_alpha"]}
    assert first.scale == config["unet.lora_alpha"] / config["unet.r"]
    assert torch.allclose(first.delta_weight(), first.scale * first.up @ first.down)
    assert any(layer.up.abs().sum() > 0 for layer in layers)  # trained, not the zero init


@pytest.mark.parametrize("prefix", ["base_model.model.", "unet.base_model.model."])
def test_a_peft_file_reads_the_same_as_the_diffusers_file(adapter, layers, tmp_path, prefix):
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(_peft_tensors(adapter, prefix), str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": layers[0].rank, "lora_alpha": layers[0].alpha, "alpha_pattern": {}}))
    assert_same_layers(read_unet_lora(folder / "adapter_model.safetensors"), layers)


def test_a_peft_file_without_config_gets_alpha_equal_to_rank(adapter, layers, tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file(_peft_tensors(adapter, "base_model.model."), str(path))
    assert {layer.alpha for layer in read_unet_lora(path)} == {float(layers[0].rank)}


def test_a_kohya_file_reads_the_same_as_the_diffusers_file(adapter, layers, tmp_path):
    path = tmp_path / "kohya.safetensors"
    save_file(_kohya_tensors(adapter, layers[0].alpha), str(path), metadata={"ss_network_dim": "8"})
    assert_same_layers(read_unet_lora(path), layers)


def test_text_encoder_lora_is_ignored(adapter, layers, tmp_path):
    tensors = _kohya_tensors(adapter, layers[0].alpha)
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.ones(8, 16)
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.ones(16, 8)
    tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(3.0)
    path = tmp_path / "kohya_te.safetensors"
    save_file(tensors, str(path))
    assert_same_layers(read_unet_lora(path), layers)


def test_write_kohya_round_trips_per_layer_alphas(layers, tmp_path):
    per_layer_alpha = [replace(layer, alpha=float(i + 1)) for i, layer in enumerate(layers)]
    path = write_kohya(tmp_path / "kohya.safetensors", per_layer_alpha)
    assert_same_layers(read_unet_lora(path), per_layer_alpha)


def test_write_kohya_output_loads_in_diffusers(layers, tmp_path, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    path = write_kohya(tmp_path / "kohya.safetensors", layers)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir), safety_checker=None)
    pipe.load_lora_weights(str(path), adapter_name="kohya")
    for layer in layers:
        module = pipe.unet.get_submodule(layer.name)
        assert torch.equal(module.lora_A["kohya"].weight, layer.down), layer.name
        assert torch.equal(module.lora_B["kohya"].weight, layer.up), layer.name
        assert module.scaling["kohya"] == pytest.approx(layer.scale), layer.name


def test_write_unet_lora_round_trips_with_save_lora_keys(adapter, layers, tmp_path):
    path = write_unet_lora(tmp_path / "out.safetensors", layers, {"privdiff.note": "x"})
    assert_same_layers(read_unet_lora(path), layers)
    written, metadata = read_lora(path)
    original, _ = read_lora(adapter)
    assert sorted(written) == sorted(original)
    assert set(metadata) == {"format", "lora_adapter_metadata", "privdiff.note"}
    assert not list(tmp_path.glob(".out*"))  # no temporary file left behind


def test_write_unet_lora_refuses_mixed_ranks_or_alphas(layers, tmp_path):
    with pytest.raises(ModelError, match="one rank and one alpha"):
        write_unet_lora(tmp_path / "x.safetensors", [layers[0], replace(layers[1], alpha=99.0)])
    smaller = replace(layers[1], down=layers[1].down[:2], up=layers[1].up[:, :2])
    with pytest.raises(ModelError, match="one rank and one alpha"):
        write_unet_lora(tmp_path / "x.safetensors", [layers[0], smaller])
    assert not (tmp_path / "x.safetensors").exists()


def test_in_memory_peft_tensors_give_the_file_layers(adapter, layers, tiny_pipeline_dir):
    from diffusers import UNet2DConditionModel

    from privdiff.models.lora import load_lora_into_unet

    unet = UNet2DConditionModel.from_pretrained(str(tiny_pipeline_dir / "unet"))
    load_lora_into_unet(unet, adapter)
    assert_same_layers(layers_from_state_dict(get_peft_model_state_dict(unet), alpha=layers[0].alpha), layers)


def _one_line_model_error(path: Path, match: str) -> None:
    with pytest.raises(ModelError, match=match) as info:
        read_unet_lora(path)
    assert "\n" not in str(info.value)


def test_a_file_without_unet_lora_tensors_is_a_one_line_error(tmp_path):
    text_only = tmp_path / "text_only.safetensors"
    save_file({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight": torch.ones(4, 16),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.up.weight": torch.ones(16, 4)},
              str(text_only))
    _one_line_model_error(text_only, "no UNet LoRA tensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.ones(4, 4)}, str(plain))
    _one_line_model_error(plain, "no UNet LoRA tensors")


def test_mismatched_or_missing_matrices_are_one_line_errors(tmp_path):
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    mismatched = tmp_path / "mismatched.safetensors"
    save_file({f"{name}.lora.down.weight": torch.ones(8, 16), f"{name}.lora.up.weight": torch.ones(16, 4)},
              str(mismatched))
    _one_line_model_error(mismatched, "different ranks")
    lonely = tmp_path / "lonely.safetensors"
    save_file({f"{name}.lora.down.weight": torch.ones(8, 16)}, str(lonely))
    _one_line_model_error(lonely, "lora_B .* missing")
    conv = tmp_path / "conv.safetensors"
    save_file({f"{name}.lora.down.weight": torch.ones(8, 16, 1, 1), f"{name}.lora.up.weight": torch.ones(16, 8, 1, 1)},
              str(conv))
    _one_line_model_error(conv, "only 2-D")
    dora = tmp_path / "dora.safetensors"
    save_file({f"{name}.lora_A.weight": torch.ones(8, 16), f"{name}.lora_B.weight": torch.ones(16, 8),
               f"{name}.lora_magnitude_vector": torch.ones(16)}, str(dora))
    _one_line_model_error(dora, "DoRA")
    bad_config = tmp_path / "bad_config.safetensors"
    save_file({f"{name}.lora_A.weight": torch.ones(8, 16), f"{name}.lora_B.weight": torch.ones(16, 8)},
              str(bad_config), metadata={"lora_adapter_metadata": "[1, 2"})
    _one_line_model_error(bad_config, "not a JSON object")


def test_an_unreadable_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    _one_line_model_error(bad, "header is not valid JSON")
    _one_line_model_error(tmp_path / "missing.safetensors", "not found")


def test_refactor_divides_the_scale_out_and_zero_pads():
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 6, generator=generator, dtype=torch.float64) @ torch.randn(6, 10, generator=generator,
                                                                                        dtype=torch.float64)
    u, sigma, vh = torch.linalg.svd(delta)
    best2 = u[:, :2] @ torch.diag(sigma[:2]) @ vh[:2]
    up, down = refactor(delta, rank=6, keep=2, scale=1.75)
    assert up.shape == (12, 6) and down.shape == (6, 10)
    assert not up[:, 2:].any() and not down[2:].any()
    assert torch.allclose(1.75 * up @ down, best2, atol=1e-10)
    up, down = refactor(delta, rank=6, scale=0.5)
    assert torch.allclose(0.5 * up @ down, delta, atol=1e-10)
    for bad in (0, 7):
        with pytest.raises(ConfigError):
            refactor(delta, rank=6, keep=bad)


def _random_invertible(rank: int, generator: torch.Generator) -> torch.Tensor:
    """Q1 · diag(s) · Q2 with s in [0.5, 2]: random, invertible and well conditioned."""
    q1, _ = torch.linalg.qr(torch.randn(rank, rank, generator=generator, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(rank, rank, generator=generator, dtype=torch.float64))
    return q1 @ torch.diag(0.5 + 1.5 * torch.rand(rank, generator=generator, dtype=torch.float64)) @ q2


def test_canonical_mode_is_gauge_invariant_and_keeps_delta_w(layers):
    generator = torch.Generator().manual_seed(1)
    gauged = []
    for layer in layers:
        m = _random_invertible(layer.rank, generator)
        gauged.append(replace(layer, down=(m @ layer.down.double()).float(),
                              up=(layer.up.double() @ torch.linalg.inv(m)).float()))
    assert not torch.allclose(gauged[0].down, layers[0].down)
    canonical, canonical_gauged = canonical_layers(layers), canonical_layers(gauged)
    for original, a, b in zip(layers, canonical, canonical_gauged):
        sigma = torch.linalg.svdvals(original.delta_weight(torch.float64))[:original.rank]
        assert (sigma[:-1] - sigma[1:]).min() > 1e-4 * sigma[0]  # distinct: invariance is exact, not up to sign
        tol = 1e-4 * max(a.up.abs().max().item(), a.down.abs().max().item())
        assert torch.allclose(a.up, b.up, atol=tol) and torch.allclose(a.down, b.down, atol=tol), a.name
        delta = original.delta_weight(torch.float64)
        assert torch.allclose(a.delta_weight(torch.float64), delta, atol=1e-5 * delta.abs().max().item())
        assert (a.name, a.alpha, a.up.shape, a.down.shape) == (original.name, original.alpha, original.up.shape,
                                                                original.down.shape)
