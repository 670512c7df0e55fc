"""Fixtures shared by the weights tests: a real adapter file (the finished tiny run's) and its layers."""

from __future__ import annotations

from pathlib import Path

import pytest

from privdiff.models.lora import LORA_WEIGHT_NAME
from privdiff.weights.lora_math import LoRALayer, read_unet_lora


@pytest.fixture(scope="module")
def adapter(finished_tiny_run: Path) -> Path:
    return finished_tiny_run / LORA_WEIGHT_NAME


@pytest.fixture(scope="module")
def layers(adapter: Path) -> list[LoRALayer]:
    return read_unet_lora(adapter)
