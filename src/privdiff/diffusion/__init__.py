"""Diffusion arithmetic shared by training, DP clipping and every attack: the per-example loss, the
noise schedule, and the encoded datasets (`task`) they run on."""

from privdiff.diffusion.loss import (
                                     draw_noise_and_timesteps,
                                     noisy_and_target,
                                     per_example_loss,
                                     squared_error,
                                     training_target,
)

__all__ = ["draw_noise_and_timesteps", "noisy_and_target", "per_example_loss", "squared_error", "training_target"]
