"""Gray-box attacks that only query the denoiser: loss threshold, PIA, SecMI-stat, SimA.

The loss threshold scores the training loss (`privdiff.diffusion.per_example_loss`); PIA and SecMI take
√ᾱ_t and √(1 − ᾱ_t) from `privdiff.diffusion.signal_and_noise_floats`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from privdiff.audit.attacks.base import GridAttack, register_attack
from privdiff.audit.model import Candidates, Denoiser
from privdiff.diffusion import half_power, signal_and_noise_floats


def scales(model: Denoiser, t: int) -> tuple[float, float]:
    """(√ᾱ_t, √(1 − ᾱ_t)) of the model's scheduler, rounded as the audit always has (`half_power`)."""
    return signal_and_noise_floats(model.scheduler.alphas_cumprod, t, sqrt=half_power)


@register_attack
class LossThreshold(GridAttack):
    """-(1/K) Σ_k L(x0, n_k, t, c) with K fixed noises (Matsumoto et al.), L the per-example training
    loss: ||n_k - ε_θ(x_t(x0, n_k), t, c)||² / d for an ε-prediction model, the velocity's error for a
    v-prediction one, so the quantity attacked is the quantity trained."""

    name = "loss"
    access = "gray"
    grid: ClassVar[tuple[int, ...]] = (10, 50, 100, 200, 300, 500, 700)
    num_noises = 8

    def score_at(self, model: Denoiser, examples: Candidates, value: int) -> np.ndarray:
        noises = examples.noises(self.seed, self.num_noises)
        total = torch.zeros(len(examples), dtype=torch.float64)
        for noise in noises:
            total += model.loss(examples.latents, noise, value, examples.contexts).double()
        return -(total / self.num_noises).numpy()

    def queries_per_example(self) -> int:
        return self.num_noises


@register_attack
class PIA(GridAttack):
    """Proximal initialisation (Kong et al., arXiv 2305.18355): ε0 = ε_θ(x0, 0, c) replaces the noise;
    score -Σ |ε0 - ε_θ(x_t(x0, ε0), t, c)|⁴."""

    name = "pia"
    access = "gray"
    grid: ClassVar[tuple[int, ...]] = tuple(range(20, 201, 20))

    def score_at(self, model: Denoiser, examples: Candidates, value: int) -> np.ndarray:
        eps0 = model.eps(examples.latents, 0, examples.contexts)
        a, b = scales(model, value)
        pred = model.eps(a * examples.latents + b * eps0, value, examples.contexts)
        return -((eps0 - pred).abs() ** 4).sum(dim=(1, 2, 3)).double().numpy()

    def queries_per_example(self) -> int:
        return 2


def ddim_step(model: Denoiser, x_a: torch.Tensor, a: int, b: int, eps: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM move from timestep a to b with the prediction ε̂ (up or down)."""
    ra, sa = scales(model, a)
    rb, sb = scales(model, b)
    x0_hat = (x_a - sa * eps) / ra
    return rb * x0_hat + sb * eps


@register_attack
class SecMIStat(GridAttack):
    """SecMI-stat (Duan et al., arXiv 2302.01316): DDIM-invert x0 to t_sec with stride k, take one
    denoising step back to t_sec - k and compare with the inverted point there."""

    name = "secmi"
    access = "gray"
    grid: ClassVar[tuple[int, ...]] = (50, 100, 150, 200)
    stride = 10

    def score_at(self, model: Denoiser, examples: Candidates, value: int) -> np.ndarray:
        k = max(1, model.scale_timestep(self.stride))
        x, t = examples.latents, 0
        path = {0: x}
        while t < value:
            x = ddim_step(model, x, t, t + k, model.eps(x, t, examples.contexts))
            t += k
            path[t] = x
        back = ddim_step(model, x, t, t - k, model.eps(x, t, examples.contexts))
        self.last_queries = t // k + 1
        return -((back - path[t - k]) ** 2).sum(dim=(1, 2, 3)).double().numpy()

    def queries_per_example(self) -> int:
        return getattr(self, "last_queries", 100 // self.stride + 1)


@register_attack
class SimA(GridAttack):
    """SimA (Rao, Qu, Moyer, arXiv 2509.25003): -Σ |ε_θ(x0, t, c)|⁴ at the clean input."""

    name = "sima"
    access = "gray"
    grid: ClassVar[tuple[int, ...]] = tuple(range(0, 201, 10))

    def score_at(self, model: Denoiser, examples: Candidates, value: int) -> np.ndarray:
        return -(model.eps(examples.latents, value, examples.contexts).abs() ** 4).sum(dim=(1, 2, 3)).double().numpy()

    def queries_per_example(self) -> int:
        return 1
