"""Split-learning fixtures: the tiny test pipeline's public models and a small fill simulation."""

from __future__ import annotations

from pathlib import Path

import pytest

from privdiff.split.config import SplitConfig, load_split_config
from privdiff.split.models import PublicModels, load_public_models


def split_config(pipeline_dir: Path, *overrides: str) -> SplitConfig:
    base = [f"model.pretrained={pipeline_dir}", "data.num_examples=24", "data.test_examples=8",
            "train.request_size=4", "train.steps=4", "train.checkpoint_every=2", "eval.num_samples=4",
            "eval.num_inference_steps=2"]
    return load_split_config(None, base + list(overrides))


@pytest.fixture(scope="session")
def public_models(tiny_pipeline_dir: Path) -> PublicModels:
    return load_public_models(str(tiny_pipeline_dir))
