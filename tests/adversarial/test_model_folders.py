"""Model folders saved by other tools: a tokenizer without `model_max_length` (transformers then reads
the 1e30 sentinel and padding overflowed) loads, trains and samples; missing pieces are one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from privdiff.models.load import load_pipeline
from tests.adversarial.conftest import refused


@pytest.fixture
def pipeline_without_max_length(tiny_pipeline_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir, folder)
    config_file = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["model_max_length"]
    config_file.write_text(json.dumps(config))
    return folder


def test_tokenizer_length_falls_back_to_the_text_encoders_positions(pipeline_without_max_length: Path):
    """Issue 26, finding 4: `OverflowError: int too big to convert` deep in the tokenizer."""
    pipe = load_pipeline(pipeline_without_max_length)
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 16


@pytest.mark.slow
def test_such_a_folder_fine_tunes_and_samples(pipeline_without_max_length: Path, tmp_path: Path, capsys):
    from privdiff.cli import main

    out = tmp_path / "run"
    code = main(["finetune", "--pretrained", str(pipeline_without_max_length), "--out", str(out), "--steps", "1",
                 "--batch-size", "2", "--num-examples", "8", "--set", "sample.num_images=1",
                 "--set", "sample.num_inference_steps=1", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (out / "summary.json").is_file()


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "model_index.json").unlink(), "not a diffusers pipeline folder"),
    (lambda f: shutil.rmtree(f / "unet"), "cannot load pipeline"),
    (lambda f: (f / "unet" / "config.json").write_text("{not json"), "cannot load pipeline"),
])
def test_a_damaged_model_folder_is_refused_in_one_line(damage, message, tiny_pipeline_dir: Path, tmp_path: Path,
                                                       capsys):
    folder = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir, folder)
    damage(folder)
    out = tmp_path / "run"
    assert message in refused(["finetune", "--pretrained", str(folder), "--out", str(out), "--steps", "1",
                               "--num-examples", "8", "--batch-size", "2", "--quiet"], capsys)
    assert not out.exists()
