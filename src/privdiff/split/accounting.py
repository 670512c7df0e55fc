"""Local-DP accounting of the hardened protocol (split-controlnet.md §10): noisy target plus latent clipping.

Per coordinate, with a = √ᾱ_t and b = √(1 − ᾱ_t), the pair (x_t, n' = n + η) given z0 depends on z0
only through u = x_t − b/(1 + s²)·n' ~ N(a·z0, b²s²/(1 + s²)). A release is therefore the Gaussian
mechanism z0 + N(0, σ_eff²) with σ_eff = b·s/(a·√(1 + s²)); with ||z0|| ≤ R (replace-one
sensitivity 2R) it is μ-GDP with μ = 2R·a·√(1 + s²)/(b·s). h, s0, the activation and the fp16 cast
are post-processing. Releases compose as μ_tot = √(Σ μ_i²); ε at δ is the exact Gaussian tradeoff.
a and b come from the scheduler's `alphas_cumprod` through `privdiff.diffusion.signal_and_noise_floats`
(never re-derived here). Pure functions; `ReleaseLedger` is the only state.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm

from privdiff.diffusion import signal_and_noise_floats


def sigma_eff(a: float, b: float, s: float) -> float:
    """Effective Gaussian noise on each coordinate of z0 of one release (s = ∞: x_t alone)."""
    if math.isinf(s):
        return b / a
    return b * s / (a * math.sqrt(1.0 + s * s))


def mu_image(*, a: float, b: float, s: float, clip: float) -> float:
    """μ of one release of the image latent: sensitivity 2R over σ_eff (∞ without target noise)."""
    if s <= 0:
        return math.inf
    return 2.0 * clip / sigma_eff(a, b, s)


def mu_condition(*, clip: float | None, noise: float) -> float:
    """μ of one release of the condition latent: 2R_c/s_c (∞ when the condition is not protected)."""
    if clip is None or noise <= 0:
        return math.inf
    return 2.0 * clip / noise


def compose(mus) -> float:
    """μ of several independent Gaussian releases of the same input."""
    return math.sqrt(sum(m * m for m in mus))


def gdp_delta(mu: float, epsilon: float) -> float:
    """δ(ε) of μ-GDP: Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2) (Balle & Wang 2018, Dong et al. 2019)."""
    # e^ε·Φ(·) in log space: ε reaches thousands for the weak settings people will try
    return float(norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon + norm.logcdf(-epsilon / mu - mu / 2)))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest ε with δ(ε) ≤ δ for μ-GDP (∞ for μ = ∞, 0 when even ε = 0 meets δ)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if math.isinf(mu):
        return math.inf
    if mu <= 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    high = 1.0
    while gdp_delta(mu, high) > delta:
        high *= 2
    return float(brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, high, xtol=1e-10, rtol=1e-12))


def release_mu(alphas_cumprod, t: int, *, target_noise: float, latent_clip: float | None) -> float:
    """μ of one release of the image latent at timestep t (∞ without a clip bound or target noise).
    The condition latent's μ (`mu_condition`) composes with it per release."""
    if latent_clip is None:
        return math.inf
    a, b = signal_and_noise_floats(alphas_cumprod, t)
    return mu_image(a=a, b=b, s=target_noise, clip=latent_clip)


def reference_formula_epsilon(t_start: int = 0, num_train_timesteps: int = 1000) -> float:
    """The author's research-code figure: mean over t ≥ t_start of √(1/β_t − 1), β_t = 1e-4 + 2e-5·t.

    Single-step β, no clipping bound, no δ: printed as "reference formula, not a guarantee".
    """
    t = np.arange(t_start, num_train_timesteps, dtype=np.float64)
    beta = 1e-4 + 2e-5 * t
    return float(np.sqrt(1.0 / beta - 1.0).mean())


class ReleaseLedger:
    """Per-example Σ μ² over its releases, of the image latent alone and of image plus condition (kept by
    the client, which alone knows which example was sent). Without condition protection the total is ∞:
    the condition is recoverable (split-controlnet.md §9.3 step 3), and the image-only figure is reported beside it."""

    def __init__(self, alphas_cumprod, *, target_noise: float, latent_clip: float | None,
                 condition_clip: float | None, condition_noise: float, delta: float) -> None:
        self.alphas_cumprod = alphas_cumprod
        self.settings = {"target_noise": target_noise, "latent_clip": latent_clip,
                         "condition_clip": condition_clip, "condition_noise": condition_noise}
        self.delta = delta
        self.image_mu_squared: dict[int, float] = defaultdict(float)
        self.releases: dict[int, int] = defaultdict(int)

    @property
    def condition_mu(self) -> float:
        return mu_condition(clip=self.settings["condition_clip"], noise=self.settings["condition_noise"])

    def _image_mu(self, t: int) -> float:
        return release_mu(self.alphas_cumprod, t, target_noise=self.settings["target_noise"],
                          latent_clip=self.settings["latent_clip"])

    def record(self, indices, timesteps) -> None:
        for index, t in zip(indices, timesteps):
            self.image_mu_squared[int(index)] += self._image_mu(int(t)) ** 2
            self.releases[int(index)] += 1

    def state_dict(self) -> dict:
        return {"image_mu_squared": dict(self.image_mu_squared), "releases": dict(self.releases)}

    def load_state_dict(self, state: dict) -> None:
        self.image_mu_squared = defaultdict(float, {int(k): float(v) for k, v in state["image_mu_squared"].items()})
        self.releases = defaultdict(int, {int(k): int(v) for k, v in state["releases"].items()})

    def summary(self, t_start: int) -> dict:
        """The worst example's μ and ε so far (image alone, and with the condition), and the worst case
        predicted before training from t_start and the most releases of any example."""
        if not self.image_mu_squared:
            return {"examples": 0}
        worst = max(self.image_mu_squared, key=lambda i: (self.image_mu_squared[i], self.releases[i]))
        most = max(self.releases.values())
        image = math.sqrt(self.image_mu_squared[worst])
        total = compose([image, self.condition_mu * math.sqrt(self.releases[worst])])
        predicted = compose([self._image_mu(t_start), self.condition_mu]) * math.sqrt(most)
        return {"examples": len(self.image_mu_squared), "delta": self.delta, "max_releases": most,
                "worst_image_mu": image, "worst_image_epsilon": gdp_epsilon(image, self.delta),
                "worst_mu": total, "worst_epsilon": gdp_epsilon(total, self.delta),
                "predicted_worst_mu": predicted, "predicted_worst_epsilon": gdp_epsilon(predicted, self.delta),
                **self.settings}


__all__ = ["ReleaseLedger", "compose", "gdp_delta", "gdp_epsilon", "mu_condition", "mu_image",
           "reference_formula_epsilon", "release_mu", "sigma_eff"]
