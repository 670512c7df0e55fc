"""The interface every training method implements; the loop never branches on a method name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from privdiff.config import RunConfig
from privdiff.diffusion.task import DiffusionTask
from privdiff.errors import ConfigError
from privdiff.registry import Registry
from privdiff.seeding import generator


@dataclass
class TrainBatch:
    """One step's examples: rows of the task's cached tensors.

    Attributes:
        indices: (B,) row indices into the task.
        latents: (B, C, h, w).
        contexts: (B, L, D), with caption dropout already applied.
    """

    indices: torch.Tensor
    latents: torch.Tensor
    contexts: torch.Tensor


class TrainingMethod(ABC):
    """A way of training the UNet of a `DiffusionTask` (plain LoRA, DP-LoRA, SMP-LoRA, ...)."""

    name: ClassVar[str]
    data_parallel: ClassVar[bool] = False  # can run as several torchrun processes (--distributed)
    # Manifest roles beyond the members that the method reads (encoded into `task.splits`);
    # `required_roles` must be non-empty, the others may be missing (e.g. in a LiRA shadow).
    extra_roles: ClassVar[tuple[str, ...]] = ()
    required_roles: ClassVar[tuple[str, ...]] = ()
    log_name: ClassVar[str] = "train_log.jsonl"  # per-step and per-epoch rows, JSON lines
    default_snapshots: ClassVar[int] = 0  # adapters saved over the run when train.snapshots is null

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def check_inputs(self, num_examples: int, unet: torch.nn.Module) -> None:
        """Refuses data- or model-dependent settings before anything is written.

        Raises:
            ConfigError: the fixed batch is larger than the training set.
        """
        if self.config.train.batch_size > num_examples:
            raise ConfigError(f"train.batch_size {self.config.train.batch_size} is larger than the "
                              f"{num_examples} training members")

    def total_steps(self) -> int:
        """Optimisation steps of the run (DP-LoRA derives them from epochs and its sample rate)."""
        return self.config.train.steps

    def finish(self, task: DiffusionTask) -> None:
        """Called once after the last step (detach hooks, cross-process checks)."""

    def steps_per_epoch(self, num_examples: int) -> int:
        """Steps of one pass over the members (the unit of per-epoch logging)."""
        return max(1, num_examples // min(self.config.train.batch_size, num_examples))

    def epoch_end(self, task: DiffusionTask, epoch: int, last: bool) -> dict[str, float]:
        """Diagnostics logged after epoch `epoch` (1-based); `last` is the run's final epoch."""
        return {}

    def run_summary(self) -> dict[str, Any]:
        """Method-specific fields of summary.json."""
        return {}

    def batching(self) -> dict[str, Any]:
        """How the run drew its batches, as summary.json records it (the report reads it there)."""
        return {"sampling": "shuffled epochs", "batch_size": self.config.train.batch_size}  # <= N (check_inputs)

    def save_artifacts(self, run_dir: Path) -> None:
        """Writes method-specific files into the run folder (main process only)."""

    def num_snapshots(self) -> int:
        snapshots = self.config.train.snapshots
        return self.default_snapshots if snapshots is None else snapshots

    @abstractmethod
    def prepare(self, task: DiffusionTask) -> None:
        """Attaches adapters and builds the optimizer (the model is already on its device)."""

    @abstractmethod
    def step(self, task: DiffusionTask, batch: TrainBatch, rng: torch.Generator) -> dict[str, float]:
        """Runs one optimisation step; returns scalar metrics, at least `loss`."""

    def batch_indices(self, step: int, num_examples: int, rng: torch.Generator) -> torch.Tensor:
        """Rows of step `step`: shuffled epochs of fixed-size batches (drop-last)."""
        size = min(self.config.train.batch_size, num_examples)
        per_epoch = self.steps_per_epoch(num_examples)
        epoch, offset = divmod(step, per_epoch)
        order = torch.randperm(num_examples, generator=rng_for_epoch(self.config.train.seed, epoch))
        return order[offset * size:(offset + 1) * size]

    def privacy_spent(self) -> dict[str, Any] | None:
        """The privacy guarantee so far (None for methods without one)."""
        return None

    def adapter_metadata(self) -> dict[str, str]:
        """Extra safetensors header fields for the exported adapter."""
        return {}

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: trainable weights, optimizer, method state."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


METHODS: Registry[type[TrainingMethod]] = Registry("method")  # the key is the CLI word (`--method`)


def rng_for_epoch(seed: int, epoch: int) -> torch.Generator:
    return generator(seed, "epoch-order", epoch)
