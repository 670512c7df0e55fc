"""Plain (non-private) LoRA fine-tuning: the baseline every privacy method is compared with."""

from __future__ import annotations

from typing import Any

import torch

from privdiff.diffusion import draw_noise_and_timesteps, per_example_loss
from privdiff.diffusion.task import DiffusionTask
from privdiff.distributed import (
    all_reduce_gradients,
    broadcast_parameters,
    current_world,
    global_sum,
    require_identical_replicas,
)
from privdiff.errors import ConfigError
from privdiff.models.lora import add_lora
from privdiff.training.methods.base import METHODS, TrainBatch, TrainingMethod


@METHODS.register
class LoRA(TrainingMethod):
    """AdamW on peft LoRA adapters of the UNet attention projections.

    Under torchrun (`--distributed`) every process takes its rows of the step's global batch
    (rank r: positions r, r + W, ...), draws the global batch's (noise, t) and keeps its rows,
    backpropagates its share of the global mean, and the gradients are summed across processes
    before clipping: W processes take the step one process would take on the same global batch.
    """

    name = "lora"
    data_parallel = True

    def check_inputs(self, num_examples: int, unet: torch.nn.Module) -> None:
        """Raises:
            ConfigError: the batch is larger than the training set, or smaller than the number of
                processes (a process would have no example).
        """
        super().check_inputs(num_examples, unet)
        processes = current_world().size
        if min(self.config.train.batch_size, num_examples) < processes:
            raise ConfigError(f"train.batch_size {self.config.train.batch_size} is smaller than the {processes} "
                              f"processes: each needs at least one example per step")

    def prepare(self, task: DiffusionTask) -> None:
        self.world = current_world()
        self.params = self.trainable_parameters(task)
        broadcast_parameters(self.params)  # one initial adapter, whatever each process's global RNG did
        self.optimizer = torch.optim.AdamW(self.params, lr=self.config.train.learning_rate,
                                           weight_decay=self.config.train.weight_decay)
        self.global_batch_size = 0
        self.positions = torch.zeros(0, dtype=torch.long)

    def batch_indices(self, step: int, num_examples: int, rng: torch.Generator) -> torch.Tensor:
        """This process's rows of the step's global batch (all of them when alone)."""
        rows = super().batch_indices(step, num_examples, rng)
        self.global_batch_size = len(rows)
        self.positions = torch.arange(self.world.rank, len(rows), self.world.size)
        return rows[self.positions] if self.world.distributed else rows

    def draw_for_batch(self, shape: torch.Size, num_train_timesteps: int,
                       rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, timesteps) of this process's rows, drawn for the whole global batch: the same
        numbers whatever the number of processes."""
        if not self.world.distributed:
            return draw_noise_and_timesteps(shape, num_train_timesteps, rng)
        noise, timesteps = draw_noise_and_timesteps(torch.Size((self.global_batch_size, *shape[1:])),
                                                    num_train_timesteps, rng)
        return noise[self.positions], timesteps[self.positions]

    def global_mean(self, per_example: torch.Tensor) -> torch.Tensor:
        """The mean of a (B_local,) per-example quantity over the global batch (this process's
        examples carry the gradient); alone, exactly `per_example.mean()`."""
        if not self.world.distributed:
            return per_example.mean()
        return global_sum(per_example.sum()) / self.global_batch_size

    def clip_and_step(self) -> torch.Tensor:
        """Sums the gradients over the processes, clips the global gradient, steps; returns its norm."""
        all_reduce_gradients(self.params)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.train.max_grad_norm or float("inf"))
        self.optimizer.step()
        return grad_norm

    def trainable_parameters(self, task: DiffusionTask) -> list[torch.nn.Parameter]:
        return add_lora(task.unet, self.config.lora)

    def losses(self, task: DiffusionTask, batch: TrainBatch, rng: torch.Generator) -> torch.Tensor:
        """(B,) per-example denoising losses at one fresh (t, noise) draw per example."""
        noise, timesteps = self.draw_for_batch(batch.latents.shape, task.scheduler.config.num_train_timesteps, rng)
        noise, timesteps = noise.to(batch.latents.device), timesteps.to(batch.latents.device)
        return per_example_loss(task.unet, task.scheduler, batch.latents, batch.contexts, noise, timesteps)

    def step(self, task: DiffusionTask, batch: TrainBatch, rng: torch.Generator) -> dict[str, float]:
        task.unet.train()
        loss = self.global_mean(self.losses(task, batch, rng))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self.clip_and_step()
        return {"loss": loss.item(), "grad_norm": grad_norm.item()}

    def finish(self, task: DiffusionTask) -> None:
        require_identical_replicas(self.params, "the LoRA weights")

    def state_dict(self) -> dict[str, Any]:
        return {"params": [p.detach().clone() for p in self.params],
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"], strict=True):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])


@METHODS.register
class FullUNet(LoRA):
    """Trains every UNet weight (used to pre-train the base model on public data)."""

    name = "full"

    def trainable_parameters(self, task: DiffusionTask) -> list[torch.nn.Parameter]:
        task.unet.requires_grad_(True)
        return [p for _, p in sorted(task.unet.named_parameters())]
