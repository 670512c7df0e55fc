"""Feature extractors: provenance (hash-verified, local only) and the pluggable interface."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from privdiff.errors import ConfigError, ModelError
from privdiff.metrics.features import (EXTRACTORS_DIR, SHIPPED, ClassifierNet, load_classifier,
                                       load_extractor, save_classifier)
from privdiff.metrics.labels import caption_labels, label_heads


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_extractors_load_verified_and_small(name):
    extractor = load_extractor(name)
    assert extractor.id.startswith(f"{name}@sha256:") and len(extractor.id.split(":")[-1]) == 16
    assert (EXTRACTORS_DIR / name / "extractor.safetensors").stat().st_size <= 1_000_000
    assert (EXTRACTORS_DIR / name / "RECIPE.yaml").is_file()
    feats, labels = extractor.extract(np.zeros((3, 32, 32, 3), dtype=np.uint8))
    assert feats.shape == (3, 64) and feats.dtype == np.float64
    assert set(labels) == set(label_heads(name))


def test_a_tampered_weight_file_is_refused(tmp_path: Path):
    folder = tmp_path / "digits"
    shutil.copytree(EXTRACTORS_DIR / "digits", folder)
    data = bytearray((folder / "extractor.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "extractor.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256 does not match"):
        load_extractor(f"classifier:{folder}")


def test_unverified_weights_are_refused(tmp_path: Path):
    folder = tmp_path / "x"
    save_classifier(folder, ClassifierNet({"a": 2}), {"a": ["p", "q"]}, "x")
    (folder / "SHA256SUMS").unlink()
    with pytest.raises(ModelError, match="SHA256SUMS"):
        load_classifier(folder)


@pytest.mark.parametrize("spec", ["inception:https://example.com/pt_inception.pth", "clip:openai/clip-vit-base-patch32",
                                  "torchscript:hf://org/model", "clip:hub:openai/clip"])
def test_urls_and_hub_ids_are_refused(spec):
    with pytest.raises(ConfigError, match="(refused|no such local)"):
        load_extractor(spec)


def test_unknown_spec_is_refused():
    with pytest.raises(ConfigError, match="unknown feature extractor"):
        load_extractor("inceptionv3")


def test_torchscript_extractor(tmp_path: Path):
    class Pool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)

    path = tmp_path / "pool.pt"
    torch.jit.script(Pool()).save(str(path))
    extractor = load_extractor(f"torchscript:{path}")
    images = np.full((2, 8, 8, 3), 255, dtype=np.uint8)
    feats, labels = extractor.extract(images)
    assert feats.shape == (2, 6) and np.allclose(feats, 1.0) and labels == {}
    assert extractor.id.startswith("torchscript:pool@sha256:")


def test_inception_torchscript_gets_299px_in_0_255(tmp_path: Path):
    class FakeInception(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert x.shape[-1] == 299
            return x.amax(dim=(2, 3)) if return_features else x.mean(dim=(2, 3))

    path = tmp_path / "inception.pt"
    torch.jit.script(FakeInception()).save(str(path))
    feats, _ = load_extractor(f"inception:{path}").extract(np.full((1, 32, 32, 3), 255, dtype=np.uint8))
    assert np.allclose(feats, 255.0)


def test_a_non_torchscript_inception_file_gets_a_clear_error(tmp_path: Path):
    path = tmp_path / "state.pth"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(ModelError, match="export the FID Inception as TorchScript"):
        load_extractor(f"inception:{path}")


def test_clip_extractor_from_a_local_folder(tmp_path: Path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                              image_size=30, patch_size=6, projection_dim=12)
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    extractor = load_extractor(f"clip:{tmp_path / 'clip'}")
    feats, _ = extractor.extract(np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8))
    assert feats.shape == (3, 12) and extractor.input_size == 30
    assert extractor.id.startswith("clip:clip@sha256:")


def test_caption_labels_of_each_dataset():
    assert caption_labels("digits", "a handwritten digit seven") == {"digit": 7}
    assert caption_labels("glyphs", "a red letter q on a blue background") == {
        "letter": 16, "foreground": label_heads("glyphs")["foreground"].index("red"),
        "background": label_heads("glyphs")["background"].index("blue")}
    assert caption_labels("fill", "a red circle on a blue background")["circle"] == \
        label_heads("fill")["circle"].index("red")
    assert caption_labels("digits", "something else") is None
    assert caption_labels("faces", "a grayscale photo of a face") is None


def test_extractor_training_is_deterministic(tmp_path: Path):
    from dataclasses import replace

    from privdiff.recipes.extractors import RECIPES, train_extractor
    from privdiff.models.load import sha256_file

    small = replace(RECIPES["fill"], num_train=128, num_val=32, epochs=1, batch_size=32)
    first = train_extractor(small, tmp_path / "a", show_progress=False)
    second = train_extractor(small, tmp_path / "b", show_progress=False)
    assert first["validation_accuracy"] == second["validation_accuracy"]
    assert sha256_file(tmp_path / "a" / "extractor.safetensors") == sha256_file(tmp_path / "b" / "extractor.safetensors")
    assert load_extractor(f"classifier:{tmp_path / 'a'}").id.startswith("fill@sha256:")


def test_shipped_digits_extractor_recognises_real_handwritten_digits():
    """It never saw a handwritten digit (printed digits only); well above 10 % chance on the real ones."""
    from privdiff.config import DataConfig
    from privdiff.data import load_dataset

    real = load_dataset(DataConfig(name="digits", num_examples=300, seed=1))
    _, predicted = load_extractor("digits").extract(np.stack([e.image for e in real.examples]))
    truth = np.array([caption_labels("digits", e.caption)["digit"] for e in real.examples])
    assert (predicted["digit"] == truth).mean() > 0.55
