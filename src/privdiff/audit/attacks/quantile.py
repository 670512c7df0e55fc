"""A shadow-free attack: quantile regression on non-members (Tang et al., *Membership Inference
Attacks on Diffusion Models via Quantile Regression*, arXiv 2312.05140, ICML 2024).

Instead of training shadow models, fit a regressor that predicts, from features of an example that
do not depend on membership, the (1 − α) quantile of the target's statistic over non-members; an
example whose statistic exceeds its own predicted quantile is called a member, at FPR ≈ α for every
example. Here the features are the base model's (before fine-tuning) log losses at a fixed grid of
timesteps, the statistic is the target's mean log loss over the same grid (negated: higher = member),
and the regressor is a linear quantile regression (scikit-learn `QuantileRegressor`, pinball loss,
no penalty) fitted on the aux non-members only: no member label and no shadow is used. The score is
the statistic minus the predicted quantile, so the ROC runs through every α' near the fitted one.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from sklearn.linear_model import QuantileRegressor

from privdiff.audit.attacks.base import Attack, ShadowSet, register_attack
from privdiff.audit.model import Candidates, Denoiser
from privdiff.errors import ConfigError


def log_losses(model: Denoiser, examples: Candidates, timesteps: tuple[int, ...], noises: torch.Tensor) -> np.ndarray:
    """(N, len(timesteps)) log of the mean training loss over the fixed noises at each timestep."""
    columns = []
    for t in timesteps:
        total = torch.zeros(len(examples), dtype=torch.float64)
        for noise in noises:
            total += model.loss(examples.latents, noise, t, examples.contexts).double()
        columns.append(np.log(total.numpy() / len(noises) + 1e-12))
    return np.stack(columns, axis=1)


@register_attack
class QuantileRegressionAttack(Attack):
    """Target mean log loss against its predicted non-member (1 − α) quantile given the base model's losses."""

    name = "quantile"
    access = "gray+base"
    needs_base = True
    grid: ClassVar[tuple[int, ...]] = (50, 100, 200, 300)  # intermediate t leak most (membership-audit.md §4.1)
    num_noises = 4
    alpha = 0.05  # the FPR the fitted quantile targets

    def fit(self, model: Denoiser, aux_members: Candidates, aux_nonmembers: Candidates, *,
            shadows: ShadowSet | None = None, base: Denoiser | None = None) -> None:
        if base is None:
            raise ConfigError(f"{self.name} needs the base model (the model before fine-tuning)")
        self.base = base
        self.timesteps = tuple(model.scale_timestep(t) for t in self.grid)
        features, statistic = self.features(aux_nonmembers), self.statistic(model, aux_nonmembers)
        self.regressor = QuantileRegressor(quantile=1 - self.alpha, alpha=0.0, solver="highs")
        self.regressor.fit(features, statistic)
        predicted = self.regressor.predict(features)
        # the fitted plane passes through a few points: count them as on it, not above
        exceed = float((statistic - predicted > 1e-8 * (1 + np.abs(predicted))).mean())
        self.fitted = {"t": list(self.timesteps), "num_noises": self.num_noises, "quantile": 1 - self.alpha,
                       "regressor": "linear quantile regression on the base model's log losses",
                       "n_fit": len(aux_nonmembers), "aux_nonmember_exceedance": exceed}

    def features(self, examples: Candidates) -> np.ndarray:
        return log_losses(self.base, examples, self.timesteps, examples.noises(self.seed, self.num_noises))

    def statistic(self, model: Denoiser, examples: Candidates) -> np.ndarray:
        """(N,) minus the target's mean log loss over the grid (higher = member)."""
        return -log_losses(model, examples, self.timesteps, examples.noises(self.seed, self.num_noises)).mean(axis=1)

    def score(self, model: Denoiser, examples: Candidates) -> np.ndarray:
        if not hasattr(self, "regressor"):
            raise RuntimeError(f"{self.name}: fit() before score()")
        return self.statistic(model, examples) - self.regressor.predict(self.features(examples))

    def queries_per_example(self) -> int:
        """Target and base model, each K noises at every grid timestep."""
        return 2 * len(self.grid) * self.num_noises
