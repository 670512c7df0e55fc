"""DreamBooth-style LoRA (Ruiz et al., arXiv 2208.12242): instance loss plus prior preservation.

The members are the few images of one subject under a trigger prompt; the `prior` split holds
public class images of the class prompt ("a face"), one of which is added to every step with
weight `prior_weight`. The adapter starts from a seeded theta_0 (`privdiff.models.lora_math.reset_lora`)
rather than the global random stream, so a run is reproducible on its own and the weights
attack's `delta` mode knows theta_0.

With `TrainablePrompts` the text encoder gets its own LoRA adapter, trained jointly with the UNet's
(the usual DreamBooth-LoRA recipe, and weights-attack.md §4): the two prompts are then encoded
anew at every step, and the task's cached (frozen-encoder) contexts go unused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from privdiff.config import LoRAConfig, RunConfig
from privdiff.diffusion import draw_noise_and_timesteps, per_example_loss
from privdiff.diffusion.task import DiffusionTask
from privdiff.models.lora import add_lora
from privdiff.models.lora_math import DEFAULT_INIT_SEED, reset_lora
from privdiff.seeding import derive_seed
from privdiff.training.methods.base import METHODS, TrainBatch
from privdiff.training.methods.dp_lora import DPLoRA
from privdiff.training.methods.lora import LoRA


@dataclass
class TrainablePrompts:
    """A text encoder to adapt jointly with the UNet, and the token ids of the run's two prompts.

    Attributes:
        text_encoder: a private copy of the base text encoder (an adapter is attached to it).
        lora: the text-encoder adapter (e.g. r 4 on q_proj/v_proj).
        instance_ids: (1, L) token ids of the instance prompt ("a face of {trigger}").
        class_ids: (1, L) token ids of the class prompt ("a face").
    """

    text_encoder: torch.nn.Module
    lora: LoRAConfig
    instance_ids: torch.Tensor
    class_ids: torch.Tensor

    def encode(self, ids: torch.Tensor, rows: int) -> torch.Tensor:
        """(rows, L, D) contexts of one prompt through the adapted text encoder (with gradient)."""
        return self.text_encoder(ids.to(self.text_encoder.device))[0].expand(rows, -1, -1)


def text_encoder_init_seed(init_seed: int) -> int:
    """The text-encoder adapter's theta_0 stream: its own, so it never repeats the UNet's draws."""
    return derive_seed(init_seed, "text-encoder") % 2 ** 31


class SeededInit:
    """Mixin: the adapter is reset to theta_0 of `init_seed` as soon as it is attached."""

    init_seed: int
    prompts: "TrainablePrompts | None" = None

    def trainable_parameters(self, task: DiffusionTask) -> list[torch.nn.Parameter]:
        params = super().trainable_parameters(task)
        reset_lora(task.unet, self.init_seed)
        if self.prompts is not None:
            params = params + add_lora(self.prompts.text_encoder, self.prompts.lora)
            reset_lora(self.prompts.text_encoder, text_encoder_init_seed(self.init_seed))
        return params


@METHODS.register
class DreamBoothLoRA(SeededInit, LoRA):
    """AdamW on the LoRA adapter; loss = instance MSE + prior_weight x prior MSE (one prior row per step)."""

    name = "dreambooth-lora"
    data_parallel = False  # one identity's few images per fine-tune: farms split the runs, not a batch
    required_roles = ("prior",)

    def __init__(self, config: RunConfig, *, init_seed: int = DEFAULT_INIT_SEED, prior_weight: float = 1.0,
                 prompts: TrainablePrompts | None = None) -> None:
        super().__init__(config)
        self.init_seed = init_seed
        self.prior_weight = prior_weight
        self.prompts = prompts

    def step(self, task: DiffusionTask, batch: TrainBatch, rng: torch.Generator) -> dict[str, float]:
        task.unet.train()
        if self.prompts is not None:
            self.prompts.text_encoder.train()
            # The adapted text encoder, not the task's frozen cache, encodes the instance prompt.
            fresh = self.prompts.encode(self.prompts.instance_ids, len(batch.indices))
            batch = dataclasses.replace(batch, contexts=fresh)
        instance = self.losses(task, batch, rng).mean()
        loss = instance
        prior = task.splits.get("prior")
        if self.prior_weight and prior is not None and len(prior):
            row = torch.randint(0, len(prior), (1,), generator=rng)
            noise, timesteps = draw_noise_and_timesteps(prior.latents[row].shape,
                                                        task.scheduler.config.num_train_timesteps, rng)
            contexts = prior.contexts[row] if self.prompts is None else self.prompts.encode(self.prompts.class_ids, 1)
            prior_loss = per_example_loss(task.unet, task.scheduler, prior.latents[row], contexts,
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
