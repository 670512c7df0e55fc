"""The one scoring interface every membership attack plugs into (membership-audit.md §3)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from privdiff.audit.model import Candidates, Denoiser
from privdiff.audit.roc import auc
from privdiff.registry import Registry


@dataclass
class ShadowSet:
    """Shadow denoisers and, per shadow, which pool ids it trained on."""

    models: list[Denoiser]
    in_ids: list[set[str]]
    phi_cache: dict = field(default_factory=dict)

    def phi(self, loss: "Attack", examples: Candidates) -> np.ndarray:
        """(num_shadows, N) loss statistics of every shadow on `examples`."""
        key = (loss.fitted["t"], tuple(examples.ids))
        if key not in self.phi_cache:
            self.phi_cache[key] = np.stack([loss.score(m, examples) for m in self.models])
        return self.phi_cache[key]

    def masks(self, examples: Candidates) -> np.ndarray:
        return np.array([[i in ids for i in examples.ids] for ids in self.in_ids])


class Attack(ABC):
    """fit on the auxiliary split (and, for LiRA, shadow models), then score; higher scores mean "member"."""

    name: ClassVar[str]
    access: ClassVar[str]  # "gray" | "white" | "gray+shadow"
    needs_shadows: ClassVar[bool] = False  # the audit trains shadows only when an attack asks for them

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.fitted: dict = {}

    def fit(self, model: Denoiser, aux_members: Candidates, aux_nonmembers: Candidates, *,
            shadows: ShadowSet | None = None) -> None:
        """Chooses the attack's parameters on auxiliary data (and shadows) only (default: nothing to fit)."""

    @abstractmethod
    def score(self, model: Denoiser, examples: Candidates) -> np.ndarray: ...

    @abstractmethod
    def queries_per_example(self) -> int: ...


class GridAttack(Attack):
    """An attack with one parameter (a timestep) chosen by the highest AUC on the aux split."""

    grid: ClassVar[tuple[int, ...]]

    @abstractmethod
    def score_at(self, model: Denoiser, examples: Candidates, value: int) -> np.ndarray: ...

    def fit(self, model: Denoiser, aux_members: Candidates, aux_nonmembers: Candidates, *,
            shadows: ShadowSet | None = None) -> None:
        labels = np.r_[np.ones(len(aux_members)), np.zeros(len(aux_nonmembers))]
        both = Candidates.join(aux_members, aux_nonmembers)
        aucs = {v: auc(self.score_at(model, both, model.scale_timestep(v)), labels) for v in self.grid}
        best = max(aucs, key=lambda v: (aucs[v], -v))
        self.fitted = {"t": model.scale_timestep(best), "aux_auc": aucs[best],
                       "aux_auc_by_value": {str(k): v for k, v in aucs.items()}}

    def score(self, model: Denoiser, examples: Candidates) -> np.ndarray:
        if "t" not in self.fitted:
            raise RuntimeError(f"{self.name}: fit() before score()")
        return self.score_at(model, examples, self.fitted["t"])


ATTACKS: Registry[type[Attack]] = Registry("attack")
register_attack = ATTACKS.register
