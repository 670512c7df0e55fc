"""Which process this is in a `torchrun` launch, and the few collective steps privdiff needs,
all done by torch.distributed (gloo on CPU, nccl on GPUs).

privdiff has no communication layer of its own: DP training goes through Opacus' DPDDP and
DistributedDPOptimizer, the other methods all-reduce their LoRA (and proxy) gradients here,
and shadow farms split their shadows by rank (`run_farm`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from privdiff.errors import ConfigError, FailedOnMainProcess, ModelError, PrivdiffError

T = TypeVar("T")
_alone_depth = 0  # > 0 inside `training_alone()`


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
    if _alone_depth == 0 and dist.is_available() and dist.is_initialized():
        return World(rank=dist.get_rank(), size=dist.get_world_size())
    return World()


@contextmanager
def training_alone() -> Iterator[None]:
    """Inside the block this process trains as if it were the only one (a shadow of a farm: every
    rank trains its own shadows, with no collective step)."""
    global _alone_depth
    _alone_depth += 1
    try:
        yield
    finally:
        _alone_depth -= 1


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def in_process_group() -> bool:
    """This process has joined a torchrun process group (e.g. a shadow farm trains inside one)."""
    return dist.is_available() and dist.is_initialized()


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


# -- decisions taken once, for every process ---------------------------------------------------

def require_same_config(config: dict[str, Any]) -> None:
    """Compares a hash of `config` across the processes (collective; nothing when alone).

    Raises:
        ConfigError: a process was started with another config (names the first such rank;
            `FailedOnMainProcess` on the other processes, so that the line is printed once).
    """
    world = current_world()
    if not world.distributed:
        return
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    digests: list[str | None] = [None] * world.size
    dist.all_gather_object(digests, digest)
    differing = [rank for rank, other in enumerate(digests) if other != digests[0]]
    if differing:
        refusal = ConfigError if world.is_main else FailedOnMainProcess
        raise refusal(f"the processes were started with different configs: rank {differing[0]}'s differs "
                          f"from rank 0's (config hash {digests[differing[0]][:12]} vs {digests[0][:12]})")


def decided_on_main(decide: Callable[[], T]) -> T:
    """Runs `decide` on the main process and gives its result to every process (collective).

    Raises:
        PrivdiffError: `decide` raised it on the main process (re-raised there; the others raise
            `FailedOnMainProcess`, which the CLI does not print twice).
    """
    world = current_world()
    if not world.distributed:
        return decide()
    message: list[Any] = [None, None]
    error: PrivdiffError | None = None
    if world.is_main:
        try:
            message = [decide(), None]
        except PrivdiffError as err:
            error, message = err, [None, str(err)]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[1] is not None:
        raise FailedOnMainProcess(message[1])
    return message[0]


def my_share(count: int) -> list[int]:
    """The items 0..count-1 this process handles (rank r: r, r + W, ...)."""
    world = current_world()
    return list(range(world.rank, count, world.size))


def barrier() -> None:
    if current_world().distributed:
        dist.barrier()


def run_farm(count: int, job: Callable[[int], None], *, finished: Callable[[int], bool]) -> bool:
    """A farm of `count` independent jobs (shadow fine-tunes): this process runs its share (job j
    on rank j mod W), each as if it were the only process, skipping the finished ones, and
    returns once every process's share is done: True on the main process, which then gathers
    the results from the jobs' folders, in index order (so they do not depend on W).
    """
    world, mine = current_world(), my_share(count)
    with training_alone():
        for j in mine:
            if not finished(j):
                job(j)
    barrier()  # every share finished (a process that failed ends the launch instead)
    return world.is_main


# -- data parallel arithmetic ------------------------------------------------------------------

def global_sum(local: torch.Tensor) -> torch.Tensor:
    """The sum of `local` over every process; gradients flow into this process's part only.

    Each process backpropagates its own examples' share of a global-batch quantity; summing the
    parameter gradients afterwards (`all_reduce_gradients`) gives the full gradient. The value
    is the all-reduced total exactly (no rounding from the detach trick).
    """
    if not current_world().distributed:
        return local
    total = local.detach().clone()
    dist.all_reduce(total)
    return total + (local - local.detach())


def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sums the gradients of `params` over every process, in one flat buffer (a missing grad is 0)."""
    if not current_world().distributed or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def broadcast_parameters(params: Sequence[torch.Tensor]) -> None:
    """Copies the main process's values of `params` into every process (as DDP does at wrap time)."""
    if not current_world().distributed:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def require_identical_replicas(tensors: Sequence[torch.Tensor], what: str) -> None:
    """Compares a hash of `tensors` across the processes.

    Raises:
        ModelError: the replicas differ (a bug: every process must apply the same update).
    """
    world = current_world()
    if not world.distributed:
        return
    digest = hashlib.sha256(b"".join(t.detach().cpu().contiguous().numpy().tobytes() for t in tensors)).digest()
    mine = torch.tensor(list(digest[:8]), dtype=torch.int64)
    gathered = [torch.zeros_like(mine) for _ in range(world.size)]
    dist.all_gather(gathered, mine)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise ModelError(f"{what} diverged across processes (the replicas differ)")
