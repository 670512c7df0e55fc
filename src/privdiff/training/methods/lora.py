"""Plain (non-private) LoRA fine-tuning: the baseline every privacy method is compared with."""

from __future__ import annotations

from typing import Any

import torch

from privdiff.diffusion import draw_noise_and_timesteps, per_example_loss
from privdiff.diffusion.task import DiffusionTask
from privdiff.models.lora import add_lora
from privdiff.training.methods.base import METHODS, TrainBatch, TrainingMethod


@METHODS.register
class LoRA(TrainingMethod):
    """AdamW on peft LoRA adapters of the UNet attention projections."""

    name = "lora"

    def prepare(self, task: DiffusionTask) -> None:
        self.params = self.trainable_parameters(task)
        self.optimizer = torch.optim.AdamW(self.params, lr=self.config.train.learning_rate,
                                           weight_decay=self.config.train.weight_decay)

    def trainable_parameters(self, task: DiffusionTask) -> list[torch.nn.Parameter]:
        return add_lora(task.unet, self.config.lora)

    def losses(self, task: DiffusionTask, batch: TrainBatch, rng: torch.Generator) -> torch.Tensor:
        """(B,) per-example denoising losses at one fresh (t, noise) draw per example."""
        noise, timesteps = draw_noise_and_timesteps(batch.latents.shape,
                                                    task.scheduler.config.num_train_timesteps, rng)
        noise, timesteps = noise.to(batch.latents.device), timesteps.to(batch.latents.device)
        return per_example_loss(task.unet, task.scheduler, batch.latents, batch.contexts, noise, timesteps)

    def step(self, task: DiffusionTask, batch: TrainBatch, rng: torch.Generator) -> dict[str, float]:
        task.unet.train()
        loss = self.losses(task, batch, rng).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, self.config.train.max_grad_norm or float("inf"))
        self.optimizer.step()
        return {"loss": loss.item(), "grad_norm": grad_norm.item()}

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
