"""UnSplit (split-controlnet.md §9.2; Erdoğan, Küpçü, Çiçek, arXiv 2108.09033): invert the client by optimisation.

Dummy inputs x̃, c̃ ∈ [0, 1] (sigmoid of free logits) and, when the target is noisy, the noise ñ are
optimised so that the public client function reproduces what the server received:

    Σ_k w_k·mean((client_k(x̃, c̃, ñ; t) − received_k)²) + λ_n·mean(ñ²)/2
        + λ_r·[mean((x̃(x̃−1))²) + mean((c̃(c̃−1))²)] + τ_x·TV(x̃) + τ_c·TV(c̃),

per victim (victims are independent parameters; the sum over the batch keeps Adam's per-victim
steps independent of the batch size). Weighting, so that each received tensor counts comparably
whatever its channel count and t: w_k = 1 / (the victim's mean squared residual of tensor k at the
starting point), i.e. every exact tensor (h, s0 or x_t, control) starts at 1; the noisy target gets
its Gaussian likelihood weight w = 1/(2s²) (s = protocol.target_noise is public), which with
λ_n = 1 makes target plus prior the exact MAP in ñ. Means replace the spec's sums (per element).

Departures from the reference (λ_r = 1, no TV, lr 1e-3), measured on the shipped tiny base,
unprotected, 16 victims, 200 iterations, λ_r = 1, lr 0.05 from grey: the encoder maps 3×32×32 pixels to 4×8×8
latents, so matching the latents leaves a large null space that Adam fills with pixel noise (image
SSIM 0.20, below the mean-image baseline 0.45, although D(E(x̃)) is at the autoencoder ceiling).
A TV term on the image (τ_x = 1: 0.66) and starting from the mean public image and condition
(0.75; condition 0.06 -> 0.23) fix it; τ_c = 0.1 (the condition is thin outlines) helps a little.
Logits need lr ≈ 0.05: 1e-3 moves a logit by at most ~2 in 2000 iterations.

The client function is the real one in fp32 (the fp16 cast of h is left out: its rounding is a
residual the optimisation cannot remove anyway): z0 = E(2x̃ − 1).mode·scale (clipped to R when the
protocol clips), x_t = √ᾱ_t z0 + √(1−ᾱ_t) ñ with ñ = the received target when target_noise is 0,
s0 = conv_in(x_t) (or x_t), h = activation(z_c + x_t). Condition noise ξ (hardened) is not modelled.

Vanilla: the client's hint block and conv_in are private, so dummy ones (built as the client builds
them, `build_split_controlnet` with the attacker's seed: a fresh hint block whose last conv is zero,
as diffusers initialises it, and conv_in copied from the UNet) are optimised in alternation with the
inputs on the received control (one input step, then one weight step, per iteration).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from privdiff.diffusion import signal_and_noise_scales
from privdiff.errors import ConfigError
from privdiff.split.activation import ACTIVATIONS
from privdiff.split.attacks.base import (
    SPLIT_ATTACKS,
    AttackData,
    Observation,
    Reconstruction,
    SplitAttack,
    check_observation,
)
from privdiff.split.client import clip_per_example
from privdiff.split.models import build_split_controlnet


def per_example_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).flatten(1).mean(dim=1)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels, per example (anisotropic TV)."""
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
            + (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1))


@SPLIT_ATTACKS.register
class UnSplitAttack(SplitAttack):
    """Input (and, for vanilla, client-weight) optimisation against the received tensors."""

    name = "unsplit"

    def __init__(self, iterations: int = 2000, learning_rate: float = 0.05, weight_learning_rate: float = 1e-3,
                 image_prior: float = 1.0, noise_prior: float = 1.0, image_tv: float = 1.0,
                 condition_tv: float = 0.1, start: str = "public-mean", seed: int = 0) -> None:
        """`learning_rate`: Adam's on the logits of x̃ and c̃ (and on ñ); `weight_learning_rate`: on the
        vanilla dummy client weights; `seed`: their initialisation (nothing else here is random)."""
        self.iterations, self.learning_rate, self.weight_learning_rate = iterations, learning_rate, weight_learning_rate
        self.image_prior, self.noise_prior, self.seed = image_prior, noise_prior, seed
        self.image_tv, self.condition_tv, self.start = image_tv, condition_tv, start
        self.start_logits: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- the public client function, differentiable ----------------------------------------------------
    def _client(self, x01: torch.Tensor, c01: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                dummy: torch.nn.ModuleDict | None) -> dict[str, torch.Tensor]:
        models, protocol = self.data.models, self.data.config.protocol
        a, b = signal_and_noise_scales(models.scheduler.alphas_cumprod, t)
        both = models.vae.encode(2 * torch.cat([x01, c01]) - 1).latent_dist.mode() * models.scaling_factor
        z0, z_c = both[: len(x01)], both[len(x01):]
        if protocol.latent_clip is not None:
            z0 = clip_per_example(z0, protocol.latent_clip)
        if protocol.condition_clip is not None:
            z_c = clip_per_example(z_c, protocol.condition_clip)
        x_t = a * z0 + b * noise
        out = {"target": noise, "x_t": x_t}
        out["s0"] = models.unet.conv_in(x_t) if protocol.send == "s0" else x_t
        if dummy is None:
            out["h"] = ACTIVATIONS[protocol.activation](z_c + x_t)
        else:
            out["control"] = dummy["conv_in"](x_t) + dummy["hint"](c01)
        return out

    def fit(self, data: AttackData) -> None:
        """Nothing to learn; with start="public-mean" the dummy inputs start at the mean public image and
        condition (kept inside [0.05, 0.95] so the sigmoid is not saturated), else at grey."""
        super().fit(data)
        if self.start not in ("public-mean", "grey"):
            raise ConfigError(f"unsplit: start must be public-mean or grey, not {self.start!r}")
        self.start_logits = None
        if self.start == "public-mean":
            def mean_logit(arrays: list[np.ndarray]) -> torch.Tensor:
                mean = torch.from_numpy(np.stack(arrays)).float().div(255).mean(0).permute(2, 0, 1)
                return torch.logit(mean.clamp(0.05, 0.95)).unsqueeze(0)

            examples = data.public.examples
            self.start_logits = (mean_logit([ex.image for ex in examples]),
                                 mean_logit([ex.conditioning for ex in examples]))

    # -- the attack ------------------------------------------------------------------------------------
    def reconstruct(self, observation: Observation) -> Reconstruction:
        """Optimises one set of dummies per victim, all victims at once. The public models' weights are
        switched to requires_grad=False meanwhile so that no gradient accumulates in them."""
        check_observation(self, observation)
        started = time.perf_counter()
        models = self.data.models
        frozen = [p for m in (models.vae, models.unet) for p in m.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            result = self._optimise(observation)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        result.diagnostics["reconstruct_seconds"] = time.perf_counter() - started
        return result

    def _optimise(self, observation: Observation) -> Reconstruction:
        models, protocol = self.data.models, self.data.config.protocol
        received = {k: v.float() for k, v in observation.tensors.items() if k != "t"}
        if "x_t" in received:
            received["s0"] = received.pop("x_t")
        t, n = observation.t, len(observation)
        image_shape = (n, 3, *(s * models.vae_factor for s in received["target"].shape[2:]))
        logits_x = torch.zeros(image_shape) if self.start_logits is None else self.start_logits[0].expand(image_shape)
        logits_c = torch.zeros(image_shape) if self.start_logits is None else self.start_logits[1].expand(image_shape)
        logits_x, logits_c = logits_x.clone().requires_grad_(True), logits_c.clone().requires_grad_(True)
        noisy = protocol.target_noise > 0
        noise = received["target"].clone().requires_grad_(noisy)
        inputs = [logits_x, logits_c] + ([noise] if noisy else [])
        optimizer = torch.optim.Adam(inputs, lr=self.learning_rate, amsgrad=True)
        dummy, weight_optimizer = None, None
        if observation.design == "vanilla":
            template = build_split_controlnet(models.unet, models.vae_factor, self.seed)
            dummy = torch.nn.ModuleDict({"hint": template.controlnet_cond_embedding, "conv_in": template.conv_in})
            weight_optimizer = torch.optim.Adam(dummy.parameters(), lr=self.weight_learning_rate, amsgrad=True)
        exact = [k for k in ("h", "s0", "control") if k in received]
        weights: dict[str, torch.Tensor] = {}
        history = []
        for iteration in range(self.iterations + 1):
            x01, c01 = torch.sigmoid(logits_x), torch.sigmoid(logits_c)
            out = self._client(x01, c01, noise, t, dummy)
            residual = {k: per_example_mse(out[k], received[k]) for k in exact}
            if not weights:
                weights = {k: 1 / v.detach().clamp_min(1e-12) for k, v in residual.items()}
            data_terms = {k: weights[k] * v for k, v in residual.items()}
            loss = sum(data_terms.values())
            if noisy:
                s2 = protocol.target_noise ** 2
                loss = loss + per_example_mse(noise, received["target"]) / (2 * s2) \
                    + self.noise_prior * noise.pow(2).flatten(1).mean(1) / 2
            prior = (x01 * (x01 - 1)).pow(2).flatten(1).mean(1) + (c01 * (c01 - 1)).pow(2).flatten(1).mean(1)
            loss = loss + self.image_prior * prior
            loss = loss + self.image_tv * total_variation(x01) + self.condition_tv * total_variation(c01)
            if iteration == self.iterations:  # the last pass only measures
                history.append({k: float(v.detach().mean()) for k, v in data_terms.items()})
                break
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()
            if dummy is not None:  # then the dummy client weights, on the control the inputs produced
                control = dummy["conv_in"](out["x_t"].detach()) + dummy["hint"](c01.detach())
                weight_optimizer.zero_grad(set_to_none=True)
                (weights["control"] * per_example_mse(control, received["control"])).sum().backward()
                weight_optimizer.step()
            if iteration in (0, self.iterations // 2):
                history.append({k: float(v.detach().mean()) for k, v in data_terms.items()})
        with torch.no_grad():
            images, conditions = torch.sigmoid(logits_x), torch.sigmoid(logits_c)
        diagnostics = {"iterations": self.iterations, "learning_rate": self.learning_rate, "start": self.start,
                       "image_prior": self.image_prior, "tv": [self.image_tv, self.condition_tv],
                       "noise_prior": self.noise_prior if noisy else None,
                       "relative_residual": {"start": history[0], "middle": history[1] if len(history) > 2 else None,
                                             "final": history[-1]},
                       "noise_optimised": noisy, "dummy_client_weights": dummy is not None}
        return Reconstruction(images, conditions, diagnostics)


__all__ = ["UnSplitAttack", "per_example_mse", "total_variation"]
