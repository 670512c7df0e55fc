"""RMIA, the robust membership inference attack (Zarifzadeh et al., arXiv 2312.03262), on the
diffusion signals of the gray-box attacks, with the LiRA shadows as its reference models.

Per-example quantity: a gray-box statistic φ (the loss attack's −mean loss over K fixed noises at
its aux-chosen t, PIA's or SimA's statistic; higher = member), turned into a likelihood-like
p(x|θ) = exp(φ(x)/τ) with τ = mean |φ| over the aux split under the target, so p lies in (0, 1]
and does not depend on the statistic's units. With p(x) the reference models' average,

    score(x) = fraction of population z with (p(x|θ)/p(x)) / (p(z|θ)/p(z)) > γ,

the population being the aux non-members. Online, p(x) averages every reference (IN and OUT for x);
offline, p(x) = ((1 + a)/2)·p_OUT(x) + (1 − a)/2 from the references that did not train on x, with a
chosen on aux as the paper does. The statistic (and a) are chosen by the highest aux AUC.

With one population the fraction is a step function of x's own ratio, so ties are broken by that
ratio (the ranking, hence the ROC, is that of p(x|θ)/p(x)); γ moves only where a threshold on the
fraction falls.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from scipy.special import logsumexp

from privdiff.audit.attacks.base import (
    Attack,
    GridAttack,
    ShadowSet,
    reference_set,
    register_attack,
)
from privdiff.audit.attacks.gray_box import PIA, LossThreshold, SimA
from privdiff.audit.model import Candidates, Denoiser
from privdiff.audit.roc import auc
from privdiff.errors import ConfigError

SIGNALS: dict[str, type[GridAttack]] = {"loss": LossThreshold, "pia": PIA, "sima": SimA}


class _RMIA(Attack):
    access = "gray+shadow"
    needs_shadows = True
    online: ClassVar[bool]
    gamma = 1.0
    references: int | None = None  # None: every shadow (online) / every OUT shadow (offline)
    refit_signals = True  # False: keep statistics already fitted on this target (several RMIA variants, one fit)
    offline_a: ClassVar[tuple[float, ...]] = tuple(np.round(np.linspace(0, 1, 11), 2))

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.signals = {name: kind(seed) for name, kind in SIGNALS.items()}
        self._own: dict = {}  # the target's statistics, reused across the choices tried on aux

    def fit(self, model: Denoiser, aux_members: Candidates, aux_nonmembers: Candidates, *,
            shadows: ShadowSet | None = None, base: Denoiser | None = None) -> None:
        if shadows is None:
            raise ConfigError(f"{self.name} needs shadow models (audit --shadows N)")
        self.shadows = reference_set(shadows, self.references, self.online)
        self._own.clear()
        self.population = aux_nonmembers
        aux = Candidates.join(aux_members, aux_nonmembers)
        labels = np.r_[np.ones(len(aux_members)), np.zeros(len(aux_nonmembers))]
        self.temperature, aux_auc = {}, {}
        for name, statistic in self.signals.items():
            if self.refit_signals or "t" not in statistic.fitted:
                statistic.fit(model, aux_members, aux_nonmembers)  # its timestep, chosen on aux as for the attack
            self.temperature[name] = max(float(np.abs(statistic.score(model, aux)).mean()), 1e-12)
            for a in ((None,) if self.online else self.offline_a):
                self.choice = (name, a)
                aux_auc[(name, a)] = auc(self.score(model, aux), labels)
        self.choice = max(aux_auc, key=lambda key: (aux_auc[key], key[1] or 0))
        name, a = self.choice
        self.fitted = {"signal": name, "t": self.signals[name].fitted["t"], "temperature": self.temperature[name],
                       "a": a, "gamma": self.gamma, "references": self.num_references(),
                       "population": len(aux_nonmembers), "aux_auc": aux_auc[self.choice],
                       "aux_auc_by_value": {f"{n}" + ("" if x is None else f"@a={x}"): v
                                            for (n, x), v in aux_auc.items()}}

    def num_references(self) -> int:
        """Reference models per example: every shadow online, the OUT half offline."""
        return len(self.shadows.models) // (1 if self.online else 2)

    def log_ratio(self, model: Denoiser, examples: Candidates) -> np.ndarray:
        """(N,) log p(x|θ)/p(x) with the chosen statistic (and a)."""
        name, a = self.choice
        statistic, tau = self.signals[name], self.temperature[name]
        key = (id(model), name, tuple(examples.ids))
        if key not in self._own:
            self._own[key] = statistic.score(model, examples)
        own = self._own[key] / tau
        refs = self.shadows.phi(statistic, examples) / tau  # (num_shadows, N)
        if self.online:
            return own - (logsumexp(refs, axis=0) - np.log(len(refs)))
        outside = ~self.shadows.masks(examples)
        log_p_out = logsumexp(np.where(outside, refs, -np.inf), axis=0) - np.log(outside.sum(0))
        with np.errstate(divide="ignore"):  # a = 1 leaves p_OUT alone: log 0 = -inf in logaddexp
            log_p = np.logaddexp(np.log((1 + a) / 2) + log_p_out, np.log((1 - a) / 2))
        return own - log_p

    def score(self, model: Denoiser, examples: Candidates) -> np.ndarray:
        if not hasattr(self, "choice"):
            raise RuntimeError(f"{self.name}: fit() before score()")
        ratio_x = self.log_ratio(model, examples)
        ratio_z = self.log_ratio(model, self.population)
        fraction = (ratio_x[:, None] - ratio_z[None, :] > np.log(self.gamma)).mean(axis=1)
        # ties between equal fractions broken by x's own ratio, within half a step
        return fraction + (0.5 + np.arctan(ratio_x) / np.pi) * 0.5 / len(ratio_z)

    def queries_per_example(self) -> int:
        if not hasattr(self, "choice"):
            return LossThreshold.num_noises * 2
        per_model = self.signals[self.choice[0]].queries_per_example()
        return per_model * (len(self.shadows.models) + 1)


@register_attack
class RMIAOnline(_RMIA):
    """RMIA with every reference model (IN and OUT for each example)."""

    name = "rmia"
    online = True


@register_attack
class RMIAOffline(_RMIA):
    """RMIA with OUT references only and the paper's linear approximation of p(x), a fitted on aux."""

    name = "rmia-offline"
    online = False
