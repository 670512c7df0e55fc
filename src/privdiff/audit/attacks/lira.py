"""LiRA with shadow LoRAs, online and offline (Carlini et al., arXiv 2112.03570; membership-audit.md §4.6)."""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

from privdiff.audit.attacks.base import Attack, ShadowSet, register_attack
from privdiff.audit.attacks.gray_box import LossThreshold
from privdiff.audit.model import Candidates, Denoiser
from privdiff.errors import ConfigError


class _LiRA(Attack):
    access = "gray+shadow"
    needs_shadows = True
    online: bool

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.loss = LossThreshold(seed)

    def fit(self, model: Denoiser, aux_members: Candidates, aux_nonmembers: Candidates, *,
            shadows: ShadowSet | None = None) -> None:
        if shadows is None:
            raise ConfigError(f"{self.name} needs shadow models (audit --shadows N)")
        self.shadows = shadows
        self.loss.fit(model, aux_members, aux_nonmembers)  # the timestep is chosen on aux, as for the loss attack
        self.fitted = {"t": self.loss.fitted["t"], "num_shadows": len(self.shadows.models),
                       "num_noises": self.loss.num_noises, "variance": "global (pooled over examples)"}

    def score(self, model: Denoiser, examples: Candidates) -> np.ndarray:
        phi = self.loss.score(model, examples)
        shadow_phi = self.shadows.phi(self.loss, examples)
        inside = self.shadows.masks(examples)
        if (inside.sum(0) == 0).any() or ((~inside).sum(0) == 0).any():
            raise ValueError("LiRA: an example has no IN or no OUT shadow (masks must be balanced)")
        mu_in = np.where(inside, shadow_phi, 0).sum(0) / inside.sum(0)
        mu_out = np.where(~inside, shadow_phi, 0).sum(0) / (~inside).sum(0)
        # With few shadows, one variance per side pooled over examples (Carlini et al.).
        sd_in = max(float(np.sqrt(((shadow_phi - mu_in) ** 2)[inside].mean())), 1e-12)
        sd_out = max(float(np.sqrt(((shadow_phi - mu_out) ** 2)[~inside].mean())), 1e-12)
        if self.online:
            return norm.logpdf(phi, mu_in, sd_in) - norm.logpdf(phi, mu_out, sd_out)
        # log Φ keeps the ranking of Φ without saturating at 1 for confident members.
        return norm.logcdf((phi - mu_out) / sd_out)

    def queries_per_example(self) -> int:
        return self.loss.num_noises * (len(self.shadows.models) + 1)


@register_attack
class LiRAOnline(_LiRA):
    name = "lira-online"
    online = True


@register_attack
class LiRAOffline(_LiRA):
    name = "lira-offline"
    online = False
