"""Held-out denoising loss at fixed timesteps with fixed, paired noises (evaluation.md §7)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler

from privdiff.diffusion import per_example_loss
from privdiff.seeding import fixed_noise as seeded_noise

HELDOUT_ROLES = ("member_test", "nonmember_test", "nonmember_aux")


def heldout_timesteps(num_train_timesteps: int, count: int = 8) -> list[int]:
    """t_j = floor((2j - 1) T / (2J)), j = 1..J: the midpoints of J equal bins (62, 187, ... for T=1000)."""
    return [(2 * j - 1) * num_train_timesteps // (2 * count) for j in range(1, count + 1)]


def fixed_noise(latent_shape: tuple[int, ...], seed: int, example_id: str, draw: int) -> torch.Tensor:
    """The noise of (seed, example, draw): identical for every model scored with the same seed."""
    return seeded_noise(latent_shape, seed, "heldout", example_id, draw)


@torch.no_grad()
def heldout_losses(unet: torch.nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor,
                   contexts: torch.Tensor, example_ids: list[str], *, seed: int, count: int = 8,
                   batch_size: int = 128) -> tuple[np.ndarray, list[int]]:
    """Per-example, per-timestep denoising MSE.

    Returns:
        (N, J) losses and the J timesteps.
    """
    steps = heldout_timesteps(scheduler.config.num_train_timesteps, count)
    shape = tuple(latents.shape[1:])
    out = np.empty((len(example_ids), len(steps)))
    unet.eval()
    for j, t in enumerate(steps):
        for start in range(0, len(example_ids), batch_size):
            ids = example_ids[start:start + batch_size]
            noise = torch.stack([fixed_noise(shape, seed, ex, j) for ex in ids])
            timesteps = torch.full((len(ids),), t, dtype=torch.long)
            losses = per_example_loss(unet, scheduler, latents[start:start + len(ids)],
                                      contexts[start:start + len(ids)], noise, timesteps)
            out[start:start + len(ids), j] = losses.double().numpy()
    return out, steps
