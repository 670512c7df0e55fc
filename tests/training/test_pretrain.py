from pathlib import Path

import pytest

from privdiff.models.load import load_pipeline
from privdiff.recipes.glyph_base import PretrainConfig, pretrain


@pytest.mark.slow
def test_pretrain_recipe_is_reproducible(tmp_path: Path):
    recipe = PretrainConfig(num_glyphs=64, vae_steps=2, vae_batch_size=8, unet_steps=2, unet_batch_size=8)
    pretrain(tmp_path / "a", recipe, show_progress=False)
    pretrain(tmp_path / "b", recipe, show_progress=False)
    assert (tmp_path / "a" / "SHA256SUMS").read_text() == (tmp_path / "b" / "SHA256SUMS").read_text()
    assert (tmp_path / "a" / "RECIPE.yaml").exists()
    pipe = load_pipeline(tmp_path / "a")  # verifies the hashes it wrote
    assert pipe.vae.config.scaling_factor > 0
    assert not (tmp_path / "a.work").exists() and not (tmp_path / "a.tmp").exists()
