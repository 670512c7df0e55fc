"""Which process this is in a `torchrun` launch; torch.distributed does the communication.

privdiff has no communication layer of its own: data parallel DP training goes through
torch.distributed (gloo on CPU, nccl on GPUs) and Opacus' DPDDP / DistributedDPOptimizer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from privdiff.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and draws progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current_world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(rank=dist.get_rank(), size=dist.get_world_size())
    return World()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed() -> World:
    """Joins the process group that `torchrun` set up (gloo on CPU, nccl when CUDA is present).

    Raises:
        ConfigError: not started by torchrun (no RANK / WORLD_SIZE in the environment).
    """
    if dist.is_initialized():
        return current_world()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError("--distributed needs a torchrun launch, e.g. "
                          "torchrun --nproc_per_node 2 -m privdiff finetune --method dp-lora --distributed ...")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return current_world()


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
