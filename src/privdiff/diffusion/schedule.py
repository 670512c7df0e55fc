"""The noise schedule's √ᾱ_t and √(1 − ᾱ_t), the one place they are computed outside the scheduler.

x_t = √ᾱ_t·z0 + √(1 − ᾱ_t)·n is what `scheduler.add_noise` builds; attacks that invert x_t in closed
form, simulate the client by hand, take DDIM steps or feed the timestep to a decoder, and the split
protocol's DP accounting, need the two factors themselves. They take them from here, computed from the
scheduler's own `alphas_cumprod`, so no module re-derives the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def signal_and_noise_scales(alphas_cumprod: torch.Tensor, t: torch.Tensor,
                            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(√ᾱ_t, √(1 − ᾱ_t)) for a batch of timesteps, shaped to broadcast over latents.

    Args:
        alphas_cumprod: the scheduler's `alphas_cumprod`, shape (T,).
        t: integer timesteps, shape (B,).
        dtype: the precision ᾱ_t is cast to before the square roots (float64 for the closed-form
            inversions, where dividing by √ᾱ_t amplifies rounding).

    Returns:
        Two (B, 1, 1, 1) tensors of `dtype`.
    """
    alpha_bar = alphas_cumprod[t].to(dtype).view(-1, 1, 1, 1)
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def half_power(x: float) -> float:
    """x ** 0.5, libm's `pow`: it differs from the correctly rounded `math.sqrt` in the last bit for about
    0.1 % of inputs in (0, 1) (ᾱ_t at t = 794 of the Stable Diffusion schedule is one). The membership
    audit's PIA and DDIM steps use it, so their scores stay those recorded before this helper existed."""
    return x ** 0.5


def signal_and_noise_floats(alphas_cumprod: torch.Tensor, t: int,
                            sqrt: Callable[[float], float] = math.sqrt) -> tuple[float, float]:
    """(√ᾱ_t, √(1 − ᾱ_t)) at one timestep as Python floats (float64), for scalar arithmetic.

    Args:
        alphas_cumprod: the scheduler's `alphas_cumprod`, shape (T,).
        t: one integer timestep.
        sqrt: the square root, `math.sqrt` (the DP accounting) or `half_power` (the audit).
    """
    alpha_bar = float(alphas_cumprod[int(t)])
    return sqrt(alpha_bar), sqrt(1.0 - alpha_bar)


__all__ = ["half_power", "signal_and_noise_floats", "signal_and_noise_scales"]
