"""Analytic recovery (split-controlnet.md §9.3): what the published backward-free protocol gives away in closed form.

1. x_t from s0 = conv_in(x_t) by least squares through the public conv (conjugate gradients on the
   normal equations, matrix-free: the conv and its transpose);
2. z0 from the target: (x_t − b·n)/a; with the hardened noisy target n' = n + η the best linear
   estimate uses u = x_t − b/(1 + s²)·n' (split-controlnet.md §10), whose error is σ_eff per coordinate;
3. the condition latent: symsigmoid⁻¹(h) − x_t;
4. both decoded with the public autoencoder.
Nothing here is learned: it needs only the public weights and what one message carries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from privdiff.diffusion import signal_and_noise_scales
from privdiff.split.activation import symsigmoid_inverse
from privdiff.split.attacks.base import (
    SPLIT_ATTACKS,
    Observation,
    Reconstruction,
    SplitAttack,
)


def conv_operator(conv: torch.nn.Conv2d):
    """(A, Aᵀ) of a stride-1 conv without its bias, as functions on (B, C, H, W) tensors (float64)."""
    weight = conv.weight.detach().double()
    padding, dilation = conv.padding, conv.dilation
    if conv.stride not in ((1, 1), 1) or conv.groups != 1 or isinstance(padding, str):
        raise ValueError("conv_operator handles stride-1, ungrouped convs with explicit padding")

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, padding=padding, dilation=dilation)

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(y, weight, padding=padding, dilation=dilation)

    return forward, adjoint


@torch.no_grad()
def least_squares_through_conv(conv: torch.nn.Conv2d, output: torch.Tensor, in_channels: int | None = None,
                               *, tolerance: float = 1e-8, max_iterations: int = 500) -> tuple[torch.Tensor, dict]:
    """argmin_x ||conv(x) − output||² per example, by CG on AᵀA x = Aᵀ(output − bias).

    Returns x (float32) and {iterations, relative_residual}: the largest over the batch of
    ||Aᵀ(y − Ax)|| / ||Aᵀy||, the normal-equation residual CG drives down.
    """
    forward, adjoint = conv_operator(conv)
    y = output.double()
    if conv.bias is not None:
        y = y - conv.bias.detach().double().view(1, -1, 1, 1)
    rhs = adjoint(y)
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()

    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).flatten(1).sum(1).view(-1, 1, 1, 1)

    rr = dot(r, r)
    scale = rr.sqrt().clamp_min(1e-300)
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        ap = adjoint(forward(p))
        alpha = rr / dot(p, ap).clamp_min(1e-300)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = dot(r, r)
        if float((rr_new.sqrt() / scale).max()) <= tolerance:
            rr = rr_new
            break
        p = r + (rr_new / rr.clamp_min(1e-300)) * p
        rr = rr_new
    return x.float(), {"iterations": iterations, "relative_residual": float((rr.sqrt() / scale).max())}


@torch.no_grad()
def dense_conv_matrix(conv: torch.nn.Conv2d, in_shape: tuple[int, int, int]) -> torch.Tensor:
    """The conv (without bias) unrolled to a dense (out, in) float64 matrix: tiny shapes only."""
    forward, _ = conv_operator(conv)
    n = math.prod(in_shape)
    if n > 4096:
        raise ValueError(f"dense_conv_matrix: input of {n} values is too large to unroll")
    basis = torch.eye(n, dtype=torch.float64).view(n, *in_shape)
    return forward(basis).reshape(n, -1).T


@torch.no_grad()
def dense_least_squares(conv: torch.nn.Conv2d, output: torch.Tensor, in_shape: tuple[int, int, int]) -> torch.Tensor:
    """Reference solution with `torch.linalg.lstsq` on the unrolled matrix (tiny shapes)."""
    matrix = dense_conv_matrix(conv, in_shape)
    y = output.double().flatten(1)
    if conv.bias is not None:
        y = y - conv.bias.detach().double().repeat_interleave(output.shape[2] * output.shape[3])
    solution = torch.linalg.lstsq(matrix, y.T).solution.T
    return solution.view(-1, *in_shape).float()


@torch.no_grad()
def condition_number(conv: torch.nn.Conv2d, in_shape: tuple[int, int, int]) -> float | None:
    """σ_max/σ_min of the unrolled conv (None above the dense limit)."""
    try:
        singular = torch.linalg.svdvals(dense_conv_matrix(conv, in_shape))
    except ValueError:
        return None
    return float(singular.max() / singular.min().clamp_min(1e-300))


@SPLIT_ATTACKS.register
class AnalyticAttack(SplitAttack):
    """Closed-form recovery from (s0 | x_t, target, t, h); image only for vanilla (its condition goes
    through the private hint block)."""

    name = "analytic"

    @torch.no_grad()
    def reconstruct(self, observation: Observation) -> Reconstruction:
        models, protocol = self.data.models, self.data.config.protocol
        tensors, t = observation.tensors, observation.t
        diagnostics = {}
        if "x_t" in tensors:
            x_t = tensors["x_t"]
        else:
            in_shape = (int(models.unet.conv_in.in_channels), *tensors["s0"].shape[2:])
            x_t, solve = least_squares_through_conv(models.unet.conv_in, tensors["s0"])
            diagnostics.update({"cg": solve, "conv_in_condition_number": condition_number(models.unet.conv_in, in_shape)})
        a, b = signal_and_noise_scales(models.scheduler.alphas_cumprod, t, torch.float64)
        s = protocol.target_noise
        z0 = ((x_t.double() - b / (1 + s * s) * tensors["target"].double()) / a).float()
        latents = {"x_t": x_t, "z0": z0}
        vae, scale = models.vae, models.scaling_factor
        images = ((vae.decode(z0 / scale).sample + 1) / 2).clamp(0, 1)
        conditions = None
        if "h" in tensors:
            h = tensors["h"].double()
            before = symsigmoid_inverse(h) if protocol.activation == "symsigmoid" else h
            z_c = (before - x_t.double()).float()
            latents["z_c"] = z_c
            conditions = ((vae.decode(z_c / scale).sample + 1) / 2).clamp(0, 1)
        return Reconstruction(images, conditions, {**diagnostics, "latents": latents})


__all__ = ["AnalyticAttack", "condition_number", "conv_operator", "dense_conv_matrix", "dense_least_squares",
           "least_squares_through_conv"]
