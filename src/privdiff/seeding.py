"""Derived, stateless random streams: a stream is a pure function of (seed, *keys).

Every random draw in privdiff (the batch of step s, its noise, an attack's fixed noise for example
i) comes from its own derived generator. Resuming at step s therefore needs no saved RNG state,
and two models scored with the same keys see identical draws (paired comparisons).
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed that depends on `seed` and every key (order matters)."""
    text = "/".join([str(seed), *map(str, keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU torch generator for the stream (seed, *keys)."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def numpy_rng(seed: int, *keys: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


def seed_everything(seed: int) -> None:
    """Seeds the global generators too, for library code that draws from them (e.g. init)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fixed_noise(shape: tuple[int, ...], seed: int, purpose: str, example_id: str, draw: int) -> torch.Tensor:
    """The draw-th fixed noise of an example: identical under every model scored with `seed`."""
    return torch.randn(shape, generator=generator(seed, purpose, example_id, draw))
