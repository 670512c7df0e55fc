import shutil
from pathlib import Path

import pytest
import torch

from privdiff.config import LoRAConfig
from privdiff.diffusion import per_example_loss
from privdiff.errors import ModelError
from privdiff.models.load import load_pipeline, verify_checksums, write_checksums
from privdiff.models.lora import add_lora, load_lora_into_unet, save_lora
from privdiff.models.tiny import build_controlnet, build_pixel_unet, build_tiny_pipeline
from privdiff.models.tokenizer import build_tokenizer
from tests.conftest import TEST_MODEL


def test_tokenizer_round_trips_through_save_pretrained(tmp_path: Path):
    from transformers import CLIPTokenizer

    tok = build_tokenizer()
    tok.save_pretrained(str(tmp_path))
    again = CLIPTokenizer.from_pretrained(str(tmp_path))
    text = "a red letter k on a blue background"
    assert tok(text).input_ids == again(text).input_ids
    assert again.model_max_length == 16
    # common caption words are single tokens; unknown words still tokenize
    for word in ("handwritten", "digit", "letter", "red"):
        assert len(tok(word).input_ids) == 3, word  # bos, word, eos
    assert len(tok("xylophone").input_ids) > 3


def test_builders_make_working_models():
    unet = build_pixel_unet(image_size=16, channels=(16, 32), num_class_embeds=10)
    out = unet(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), class_labels=torch.tensor([3, 4])).sample
    assert out.shape == (2, 3, 16, 16)
    pipe = build_tiny_pipeline(TEST_MODEL)
    controlnet = build_controlnet(pipe.unet)
    down, mid = controlnet(torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 16, 16),
                           controlnet_cond=torch.randn(1, 3, 32, 32), return_dict=False)
    assert len(down) > 0 and all(torch.all(d == 0) for d in down)  # zero convolutions at init


def test_per_example_loss_depends_on_its_own_example_only():
    pipe = build_tiny_pipeline(TEST_MODEL)
    g = torch.Generator().manual_seed(0)
    latents, ctx = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 16, 16, generator=g)
    noise, t = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([1, 100, 500, 999])
    full = per_example_loss(pipe.unet, pipe.scheduler, latents, ctx, noise, t)
    changed = latents.clone()
    changed[3] += 5.0
    partial = per_example_loss(pipe.unet, pipe.scheduler, changed, ctx, noise, t)
    assert full.shape == (4,)
    torch.testing.assert_close(full[:3], partial[:3])
    assert not torch.isclose(full[3], partial[3])


def test_pipeline_checksums_detect_tampering(tmp_path: Path, tiny_pipeline_dir: Path):
    folder = tmp_path / "p"
    shutil.copytree(tiny_pipeline_dir, folder)
    write_checksums(folder)
    verify_checksums(folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256 does not match"):
        load_pipeline(folder)


def test_shipped_base_model_loads_offline_and_verifies():
    pipe = load_pipeline(None)
    assert pipe.unet.config.sample_size == 8 and pipe.vae.config.latent_channels == 4
    size = sum(p.stat().st_size for p in Path(pipe.name_or_path).rglob("*") if p.is_file())
    assert size <= 10 * 1024 * 1024


@pytest.mark.parametrize("folder, message", [("nowhere", "not found"), (".", "no model_index.json")])
def test_bad_pretrained_folders(folder: str, message: str, tmp_path: Path):
    path = tmp_path / folder if folder != "." else tmp_path
    with pytest.raises(ModelError, match=message):
        load_pipeline(path)


def test_mismatched_adapter_is_refused(tmp_path: Path):
    small = build_tiny_pipeline(TEST_MODEL)
    add_lora(small.unet, LoRAConfig(rank=4, alpha=2.0))
    save_lora(tmp_path / "a.safetensors", small.unet, LoRAConfig(rank=4, alpha=2.0))
    other = build_tiny_pipeline()  # the base-sized model: different layer shapes
    with pytest.raises(ModelError, match="does not match this UNet"):
        load_lora_into_unet(other.unet, tmp_path / "a.safetensors")


def test_corrupt_adapter_file(tmp_path: Path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ModelError, match="header is not valid JSON"):
        load_lora_into_unet(build_tiny_pipeline(TEST_MODEL).unet, tmp_path / "bad.safetensors")


def test_adapter_with_a_non_json_header_config_is_refused_in_one_line(tmp_path: Path):
    from safetensors.torch import load_file, save_file

    small = build_tiny_pipeline(TEST_MODEL)
    add_lora(small.unet, LoRAConfig(rank=4, alpha=2.0))
    save_lora(tmp_path / "a.safetensors", small.unet, LoRAConfig(rank=4, alpha=2.0))
    save_file(load_file(str(tmp_path / "a.safetensors")), str(tmp_path / "b.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": "{not json"})
    with pytest.raises(ModelError, match="adapter config is not a JSON object"):
        load_lora_into_unet(build_tiny_pipeline(TEST_MODEL).unet, tmp_path / "b.safetensors")
