"""Inverse-network attack (split-controlnet.md §9.1; He, Zhang, Lee, ACSAC 2019): a decoder learned on public data.

The server passes public fill triples through the public client code (`Observer` with the secret
seed `AttackData.seed`, the attacker's own) and trains a conv decoder g from what it would receive to the image and the condition. For
the backward-free design this is an exact simulation of the victim, protections included (the
protocol settings are public). For vanilla the hint block and the ControlNet conv_in are private
and change during training; this is the "initial weights" variant: the attacker simulates the
client with the known initial weights (`build_split_controlnet(..., config.train.seed)`), which is
exact only before the first gradient step (the spec's other variant, a shadow client trained on
public data, is not implemented). Those initial weights have a zero last layer (hint block) and a
conv_in copied from the UNet, so the initial control equals s0 and carries nothing of the condition;
on fill the decoder still draws the condition, as the outline of the circle it sees in the image.

Features, per design, standardised per channel on the training pool: backward-free h (as float),
s0 or x_t, target; vanilla control, s0, target; both plus √ᾱ_t and √(1 − ᾱ_t) broadcast over space.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from privdiff.diffusion import signal_and_noise_scales
from privdiff.split.attacks.base import (
    SPLIT_ATTACKS,
    AttackData,
    Observation,
    Observer,
    Reconstruction,
    SplitAttack,
    check_observation,
)

FEATURES = {"backward-free": ("h", "s0", "x_t", "target"), "vanilla": ("control", "s0", "target")}


def timestep_channels(alphas_cumprod: torch.Tensor, t: torch.Tensor, side: tuple[int, int]) -> torch.Tensor:
    """√ᾱ_t and √(1 − ᾱ_t) as two constant channels (B, 2, h, w)."""
    return torch.cat(signal_and_noise_scales(alphas_cumprod, t), dim=1).expand(-1, -1, *side)


def feature_stack(observation: Observation, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The decoder's input: the received latent-size tensors of the design, then the t channels."""
    tensors = observation.tensors
    parts = [tensors[name].float() for name in FEATURES[observation.design] if name in tensors]
    parts.append(timestep_channels(alphas_cumprod, observation.t, tuple(parts[0].shape[2:])))
    return torch.cat(parts, dim=1)


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())


class InverseDecoder(nn.Module):
    """Latent-size features -> (image, condition) in [0, 1]: a conv trunk, ×2 upsampling stages and
    one 3×3 sigmoid head per output. Each stage halves the width (not below 16) before it upsamples,
    so that the costly high-resolution convs stay narrow (CPU budget)."""

    def __init__(self, in_channels: int, width: int, upsamplings: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, in_channels, 1, 1))
        self.register_buffer("std", torch.ones(1, in_channels, 1, 1))
        self.trunk = conv_block(in_channels, width)
        stages, channels = [], width
        for _ in range(upsamplings):
            out = max(16, channels // 2)
            stages += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(out, out, 3, padding=1), nn.ReLU()]
            channels = out
        self.up = nn.Sequential(*stages)
        self.image_head = nn.Conv2d(channels, 3, 3, padding=1)
        self.condition_head = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.up(self.trunk((features - self.mean) / self.std))
        return torch.sigmoid(self.image_head(x)), torch.sigmoid(self.condition_head(x))


@SPLIT_ATTACKS.register
class InverseNetworkAttack(SplitAttack):
    """He et al.'s inverse network on the received tensors; image and condition for both designs
    (vanilla: trained on the known initial client weights)."""

    name = "inverse-network"

    def __init__(self, steps: int = 1500, batch_size: int = 32, seed: int = 0, width: int = 32,
                 pool: int = 2048, learning_rate: float = 1e-3) -> None:
        """`pool` observations of the public data (fresh t, noise and posterior samples on each pass
        over it) are simulated once, not per step: the simulation costs more than a training step
        on CPU. `seed` sets the decoder's initialisation and the batch order. Width 32 at 1500 steps
        reaches the autoencoder ceiling on the image, unprotected (measured; 64 costs ~2× per step)."""
        self.steps, self.batch_size, self.seed, self.width = steps, batch_size, seed, width
        self.pool, self.learning_rate = pool, learning_rate
        self.decoder: InverseDecoder | None = None
        self.fit_diagnostics: dict = {}

    def fit(self, data: AttackData) -> None:
        super().fit(data)
        started = time.perf_counter()
        models = data.models
        alphas = models.scheduler.alphas_cumprod
        observation, truth = Observer(data.config, models, data.public, data.seed).next(self.pool)
        features = feature_stack(observation, alphas)
        simulated = time.perf_counter() - started
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            decoder = InverseDecoder(features.shape[1], self.width, int(math.log2(models.vae_factor)))
        decoder.mean.copy_(features.mean(dim=(0, 2, 3), keepdim=True))
        decoder.std.copy_(features.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))
        optimizer = torch.optim.Adam(decoder.parameters(), lr=self.learning_rate)
        order = torch.Generator().manual_seed(self.seed)
        recent: list[float] = []
        for _ in range(self.steps):
            index = torch.randint(len(features), (self.batch_size,), generator=order)
            images, conditions = decoder(features[index])
            loss = F.mse_loss(images, truth.images[index]) + F.mse_loss(conditions, truth.conditions[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            recent = (recent + [loss.item()])[-50:]
        self.decoder = decoder.eval().requires_grad_(False)
        self.fit_diagnostics = {"steps": self.steps, "pool": len(features), "batch_size": self.batch_size,
                                "final_loss": sum(recent) / max(1, len(recent)),
                                "simulate_seconds": simulated, "fit_seconds": time.perf_counter() - started,
                                "variant": "exact simulation" if data.design == "backward-free" else "initial weights"}

    @torch.no_grad()
    def reconstruct(self, observation: Observation) -> Reconstruction:
        check_observation(self, observation)
        started = time.perf_counter()
        images, conditions = self.decoder(feature_stack(observation, self.data.models.scheduler.alphas_cumprod))
        return Reconstruction(images, conditions,
                              {"fit": dict(self.fit_diagnostics), "reconstruct_seconds": time.perf_counter() - started})


__all__ = ["FEATURES", "InverseDecoder", "InverseNetworkAttack", "feature_stack",
           "timestep_channels"]
