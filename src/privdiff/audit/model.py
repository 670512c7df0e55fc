"""What an attacker queries: a denoiser ε_θ(x_t, t, c), its training loss, and candidate examples in
model space. The schedule's √ᾱ_t terms are not derived here: they come from `privdiff.diffusion`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from privdiff.diffusion.conditioning import predict
from privdiff.diffusion.loss import per_example_loss
from privdiff.diffusion.task import EncodedSplit
from privdiff.seeding import fixed_noise


@dataclass
class Candidates(EncodedSplit):
    """Examples as the attacker holds them: clean latents x0 and caption embeddings c (rows by
    `take`, concatenation by `join`, both from `EncodedSplit`)."""

    def noises(self, seed: int, count: int, purpose: str = "audit") -> torch.Tensor:
        """(count, N, C, h, w): the fixed noises of §2, keyed by (seed, example id, k)."""
        shape = tuple(self.latents.shape[1:])
        return torch.stack([torch.stack([fixed_noise(shape, seed, purpose, i, k) for i in self.ids])
                            for k in range(count)])


class Denoiser:
    """Batched, gradient-free access to a UNet's conditional prediction and its training loss; counts
    queries."""

    def __init__(self, unet: torch.nn.Module, scheduler: DDPMScheduler, batch_size: int = 256):
        self.unet = unet.eval()
        self.scheduler = scheduler
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.batch_size = batch_size
        self.queries = 0

    @torch.no_grad()
    def eps(self, x_t: torch.Tensor, t: int | torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        """ε_θ(x_t, t, c) for a batch (one query per example; SDXL's added conditioning rides in c)."""
        n = len(x_t)
        steps = torch.full((n,), int(t), dtype=torch.long) if not torch.is_tensor(t) else t.long()
        out = [predict(self.unet, x_t[i:i + self.batch_size], steps[i:i + self.batch_size],
                       contexts[i:i + self.batch_size]).to(x_t.device, torch.float32)
               for i in range(0, n, self.batch_size)]
        self.queries += n
        return torch.cat(out)

    @torch.no_grad()
    def loss(self, x0: torch.Tensor, noise: torch.Tensor, t: int, contexts: torch.Tensor) -> torch.Tensor:
        """(N,) training loss of each example at timestep t with the given noise (one query each):
        `per_example_loss`, so the target is what the model was trained to predict (ε or v)."""
        n = len(x0)
        steps = torch.full((n,), int(t), dtype=torch.long)
        out = [per_example_loss(self.unet, self.scheduler, x0[i:i + self.batch_size],
                                contexts[i:i + self.batch_size], noise[i:i + self.batch_size],
                                steps[i:i + self.batch_size])
               for i in range(0, n, self.batch_size)]
        self.queries += n
        return torch.cat(out)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) n, through the scheduler."""
        return self.scheduler.add_noise(x0, noise, torch.full((len(x0),), int(t), dtype=torch.long))

    def scale_timestep(self, t: int) -> int:
        """Timesteps in the spec assume T = 1000; scale them to this scheduler."""
        return min(self.num_train_timesteps - 1, round(t * self.num_train_timesteps / 1000))
