"""The per-example denoising loss, shared by training, DP clipping and loss-based attacks.

Everything about the noise schedule goes through the diffusers scheduler (`add_noise`,
`get_velocity`), never re-derived here, so the quantity attacked is the quantity trained (the loss
attack scores this function's values). The √ᾱ_t factors, for the code that needs them by themselves,
come from `privdiff.diffusion.schedule`.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from privdiff.diffusion.conditioning import predict


def training_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the model is trained to predict: the noise (epsilon) or the velocity (v)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type '{kind}'")


def per_example_loss(unet: torch.nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor,
                     context: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     reduce: bool = True) -> torch.Tensor:
    """Denoising MSE of each example.

    Args:
        unet: a `UNet2DConditionModel` (adapters, if any, already attached).
        scheduler: the training noise scheduler.
        latents: clean latents z0, shape (B, C, h, w).
        context: text-encoder hidden states, shape (B, L, D) (SDXL: (B, L + k, D), see `conditioning`).
        noise: the Gaussian noise n, same shape as `latents`.
        timesteps: integer timesteps, shape (B,).
        reduce: mean over latent elements (B,) when True, else the element-wise squared error
            (B, C, h, w) used as the proxy attacker's feature.

    Returns:
        (B,) losses, one per example: nothing is averaged across the batch, so each entry depends
        on its own example only (the property DP clipping relies on).
    """
    noisy, target = noisy_and_target(scheduler, latents, noise, timesteps)
    error = squared_error(unet, noisy, timesteps, context, target)
    return error.mean(dim=(1, 2, 3)) if reduce else error


def noisy_and_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model input x_t and the regression target for (z0, noise, t); no gradient needed."""
    return scheduler.add_noise(latents, noise, timesteps), training_target(scheduler, latents, noise, timesteps)


def squared_error(unet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                  target: torch.Tensor) -> torch.Tensor:
    """Element-wise squared error of the UNet's prediction, (B, C, h, w), in float32 on `target`'s device
    (the UNet may run elsewhere: see `models.load.place_inputs`)."""
    prediction = predict(unet, noisy, timesteps, context)
    return ((prediction.float() - target.to(prediction.device).float()) ** 2).to(target.device)


def draw_noise_and_timesteps(shape: torch.Size, num_train_timesteps: int,
                             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded draw of (noise (B, C, h, w), timesteps (B,)) uniform over [0, T)."""
    noise = torch.randn(shape, generator=generator)
    timesteps = torch.randint(0, num_train_timesteps, (shape[0],), generator=generator)
    return noise, timesteps
