"""Diffusion arithmetic shared by training, DP clipping and every attack: the per-example loss (`loss`),
the noise schedule's √ᾱ_t terms (`schedule`, the only place outside the scheduler that computes them),
the one UNet call with SDXL's added conditioning packed into the context (`conditioning`), and the
encoded datasets (`task`) they run on, with their on-disk cache (`cache`)."""

from privdiff.diffusion.conditioning import predict
from privdiff.diffusion.loss import (
                                     draw_noise_and_timesteps,
                                     noisy_and_target,
                                     per_example_loss,
                                     squared_error,
                                     training_target,
)
from privdiff.diffusion.schedule import half_power, signal_and_noise_floats, signal_and_noise_scales

__all__ = ["draw_noise_and_timesteps", "half_power", "noisy_and_target", "per_example_loss", "predict",
           "signal_and_noise_floats", "signal_and_noise_scales", "squared_error", "training_target"]
