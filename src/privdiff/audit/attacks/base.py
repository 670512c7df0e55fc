"""The one scoring interface every membership attack plugs into (membership-audit.md §3)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from privdiff.audit.model import Candidates, Denoiser
from privdiff.audit.roc import auc
from privdiff.errors import ConfigError
from privdiff.registry import Registry


@dataclass
class ShadowSet:
    """Shadow denoisers and, per shadow, which pool ids it trained on."""

    models: list[Denoiser]
    in_ids: list[set[str]]
    phi_cache: dict = field(default_factory=dict)
    parent: ShadowSet | None = None  # set by `first`: the statistics are computed once, on all shadows

    def phi(self, statistic: Attack, examples: Candidates) -> np.ndarray:
        """(num_shadows, N) statistics (a fitted gray-box attack's scores) of every shadow on `examples`."""
        if self.parent is not None:
            return self.parent.phi(statistic, examples)[:len(self.models)]
        key = (statistic.name, statistic.seed, statistic.fitted["t"], tuple(examples.ids))
        if key not in self.phi_cache:
            self.phi_cache[key] = np.stack([statistic.score(m, examples) for m in self.models])
        return self.phi_cache[key]

    def masks(self, examples: Candidates) -> np.ndarray:
        """(num_shadows, N) whether each shadow trained on each example."""
        return np.array([[i in ids for i in examples.ids] for ids in self.in_ids])

    def first(self, count: int) -> ShadowSet:
        """The first `count` shadows, their statistics shared with this set: with the audit's
        complementary-pair masks every even prefix is balanced."""
        if not 1 <= count <= len(self.models):
            raise ValueError(f"asked for {count} of {len(self.models)} shadows")
        if count == len(self.models):
            return self
        root = self.parent or self
        return ShadowSet(models=self.models[:count], in_ids=self.in_ids[:count], parent=root)


def reference_set(shadows: ShadowSet, references: int | None, online: bool) -> ShadowSet:
    """The shadows an attack with `references` reference models uses: online the first N (half of
    them IN for each example), offline the first 2N, of which exactly N are OUT for each example.

    Raises:
        ConfigError: fewer shadows than that, or an odd online count.
    """
    if references is None:
        return shadows
    count = references if online else 2 * references
    if count > len(shadows.models) or (online and count % 2):
        raise ConfigError(f"{references} {'online' if online else 'offline'} references need "
                          f"{count} shadows ({'even, ' if online else ''}{len(shadows.models)} trained)")
    return shadows.first(count)


class Attack(ABC):
    """fit on the auxiliary split (and, for LiRA, shadow models), then score; higher scores mean "member"."""

    name: ClassVar[str]
    access: ClassVar[str]  # "gray" | "white" | "gray+shadow"
    needs_shadows: ClassVar[bool] = False  # the audit trains shadows only when an attack asks for them
    needs_base: ClassVar[bool] = False     # the audit loads the base model (no adapter) only when asked

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.fitted: dict = {}

    def fit(self, model: Denoiser, aux_members: Candidates, aux_nonmembers: Candidates, *,
            shadows: ShadowSet | None = None, base: Denoiser | None = None) -> None:
        """Chooses the attack's parameters on auxiliary data only (default: nothing to fit); `shadows`
        for attacks that `needs_shadows`, `base` (the model before fine-tuning) for those that
        `needs_base`."""

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
            shadows: ShadowSet | None = None, base: Denoiser | None = None) -> None:
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
