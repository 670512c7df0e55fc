"""Poisson batches for DP-SGD, drawn once for all processes (dp-lora.md §7, §12).

Every example is included independently with probability q at every step. The main process draws
the mask and broadcasts it; each process takes a fixed share of the selected rows, possibly none,
and every process steps every step. (Opacus' distributed sampler skips a process's step when its
share is empty, which desynchronises the all-reduce and the accountants.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from privdiff.distributed import World
from privdiff.errors import ConfigError


def secure_generator() -> torch.Generator:
    """A cryptographically secure generator (Opacus secure mode), from torchcsprng.

    Raises:
        ConfigError: torchcsprng is not installed.
    """
    try:
        import torchcsprng
    except ImportError:
        raise ConfigError("dp.secure_rng needs the torchcsprng package, which is not installed") from None
    return torchcsprng.create_random_device_generator("/dev/urandom")


def poisson_rows(num_examples: int, sample_rate: float, generator: torch.Generator, world: World) -> torch.Tensor:
    """The rows of this step's global Poisson batch (sorted), identical on every process."""
    mask = torch.zeros(num_examples, dtype=torch.uint8)
    if world.is_main:
        mask = (torch.rand(num_examples, generator=generator) < sample_rate).to(torch.uint8)
    if world.distributed:
        on_device = mask.cuda() if dist.get_backend() == "nccl" else mask
        dist.broadcast(on_device, src=0)
        mask = on_device.cpu()
    return torch.nonzero(mask, as_tuple=True)[0]


def local_share(rows: torch.Tensor, world: World) -> torch.Tensor:
    """This process's fixed share of the global batch (rank r takes rows r, r + W, ...)."""
    return rows[world.rank::world.size]
