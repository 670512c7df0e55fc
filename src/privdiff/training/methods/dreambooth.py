"""DreamBooth-style LoRA (Ruiz et al., arXiv 2208.12242): instance loss plus prior preservation.

The members are the few images of one subject under a trigger prompt; the `prior` split holds
public class images of the class prompt ("a face"), one of which is added to every step with
weight `prior_weight`. The adapter starts from a seeded theta_0 (`privdiff.weights.inputs.reset_lora`)
rather than the global random stream, so a run is reproducible on its own and the weights
attack's `delta` mode knows theta_0.
"""

from __future__ import annotations

import torch

from privdiff.config import RunConfig
from privdiff.diffusion import draw_noise_and_timesteps, per_example_loss
from privdiff.training.methods.base import TrainBatch
from privdiff.training.methods.dp_lora import DPLoRA
from privdiff.training.methods.lora import LoRA
from privdiff.training.task import DiffusionTask


class SeededInit:
    """Mixin: the adapter is reset to theta_0 of `init_seed` as soon as it is attached."""

    init_seed: int

    def trainable_parameters(self, task: DiffusionTask) -> list[torch.nn.Parameter]:
        from privdiff.weights.inputs import reset_lora

        params = super().trainable_parameters(task)
        reset_lora(task.unet, self.init_seed)
        return params


class DreamBoothLoRA(SeededInit, LoRA):
    """AdamW on the LoRA adapter; loss = instance MSE + prior_weight x prior MSE (one prior row per step)."""

    name = "dreambooth-lora"
    required_roles = ("prior",)

    def __init__(self, config: RunConfig, *, init_seed: int, prior_weight: float = 1.0) -> None:
        super().__init__(config)
        self.init_seed = init_seed
        self.prior_weight = prior_weight

    def step(self, task: DiffusionTask, batch: TrainBatch, rng: torch.Generator) -> dict[str, float]:
        task.unet.train()
        instance = self.losses(task, batch, rng).mean()
        loss = instance
        prior = task.splits.get("prior")
        if self.prior_weight and prior is not None and len(prior):
            row = torch.randint(0, len(prior), (1,), generator=rng)
            noise, timesteps = draw_noise_and_timesteps(prior.latents[row].shape,
                                                        task.scheduler.config.num_train_timesteps, rng)
            prior_loss = per_example_loss(task.unet, task.scheduler, prior.latents[row], prior.contexts[row],
                                          noise, timesteps).mean()
            loss = instance + self.prior_weight * prior_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.train.max_grad_norm or float("inf"))
        self.optimizer.step()
        return {"loss": loss.item(), "instance_loss": instance.item(), "grad_norm": grad_norm.item()}


class SeededDPLoRA(SeededInit, DPLoRA):
    """DP-LoRA from the same seeded theta_0 (the DP defence of the weights attack; no prior term)."""

    def __init__(self, config: RunConfig, *, init_seed: int) -> None:
        super().__init__(config)
        self.init_seed = init_seed
