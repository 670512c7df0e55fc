"""The privacy-preserving activation and the wire precision of the backward-free client (split-controlnet.md §6.1).

symsigmoid(x) = |x|·(2σ(x) − 1) = |x|·tanh(x/2): odd, strictly monotone, ≈ x|x|/2 near 0 and ≈ x for
large |x|. It is invertible (up to the fp16 cast), which is why it is not a protection on its own
against a server that knows it (split-controlnet.md §9.3); `symsigmoid_inverse` is the attacker's and the tests' tool.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from privdiff.errors import ConfigError


def symsigmoid(x: torch.Tensor) -> torch.Tensor:
    """|x|·tanh(x/2), element-wise (equal to |x|·(2σ(x) − 1), numerically better for large |x|)."""
    return x.abs() * torch.tanh(x / 2)


def symsigmoid_inverse(y: torch.Tensor, iterations: int = 60) -> torch.Tensor:
    """The x with symsigmoid(x) = y, element-wise, by safeguarded Newton steps in float64.

    symsigmoid is odd and strictly increasing, so we solve for |y| on [0, |y| + 2] (symsigmoid(x) ≥ x − 2
    for x ≥ 0) and restore the sign. Newton is started from the better of the two asymptotes and
    kept inside the bracket by bisection when it would leave it.
    """
    target = y.double().abs()
    lo = torch.zeros_like(target)
    hi = target + 2.0
    x = torch.where(target < 1.0, torch.sqrt(2.0 * target), target)  # x|x|/2 near 0, x far out
    for _ in range(iterations):
        value = x * torch.tanh(x / 2) - target
        lo = torch.where(value < 0, x, lo)
        hi = torch.where(value >= 0, x, hi)
        slope = torch.tanh(x / 2) + x / 2 / torch.cosh(x / 2) ** 2
        step = x - value / slope.clamp_min(1e-300)
        x = torch.where((step > lo) & (step < hi), step, (lo + hi) / 2)
    return (torch.sign(y.double()) * x).to(y.dtype if y.dtype.is_floating_point else torch.float64)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "symsigmoid": symsigmoid,
}
PRECISIONS: dict[str, torch.dtype] = {"fp16": torch.float16, "fp32": torch.float32}


def protect(z_c: torch.Tensor, x_t: torch.Tensor, activation: str, precision: str) -> torch.Tensor:
    """h = precision(activation(z_c + x_t)), the tensor the backward-free client sends (split-controlnet.md §6 step 3)."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation '{activation}' (choose {', '.join(ACTIVATIONS)})")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}' (choose {', '.join(PRECISIONS)})")
    return ACTIVATIONS[activation](z_c.float() + x_t.float()).to(PRECISIONS[precision])


__all__ = ["ACTIVATIONS", "PRECISIONS", "protect", "symsigmoid", "symsigmoid_inverse"]
