"""Shared by the weights tests: a real adapter file (the finished tiny run's), its layers, and paired
intervals over victims."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from privdiff.metrics.intervals import mean_interval
from privdiff.models.lora import LORA_WEIGHT_NAME
from privdiff.models.lora_math import LoRALayer, read_unet_lora


@pytest.fixture(scope="module")
def adapter(finished_tiny_run: Path) -> Path:
    return finished_tiny_run / LORA_WEIGHT_NAME


@pytest.fixture(scope="module")
def layers(adapter: Path) -> list[LoRALayer]:
    return read_unet_lora(adapter)


def paired_interval(rows: list[dict], a: str, b: str) -> tuple[float, float]:
    """Bootstrap 95 % interval of condition a − condition b, paired over victims."""
    diff = np.array([r[a]["identity_similarity"] - r[b]["identity_similarity"] for r in rows])
    return mean_interval(diff, seed=0, key=f"{a}-{b}")
