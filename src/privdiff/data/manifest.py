"""The membership manifest: which private example plays which role (smp-lora.md §2).

One manifest per private dataset, saved as `membership.json` and reused by every method, attack
and shadow model, so that all results are paired. Members and non-members are drawn from one
seeded permutation of the same data, so the split itself carries no distribution shift.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from privdiff.config import MembershipConfig
from privdiff.errors import DataError
from privdiff.seeding import derive_seed

ROLES = ("member_aux", "member_test", "nonmember_aux", "nonmember_test")
MEMBER_ROLES = ("member_aux", "member_test")


def round_half_up(x: float) -> int:
    """round(x) = floor(x + 0.5), as the spec defines it (Python's round is half-to-even)."""
    return math.floor(x + 0.5)


def role_counts(n: int, cfg: MembershipConfig) -> dict[str, int]:
    """Role sizes for `n` examples; N = 833 gives 200/233/200/200, N = 256 gives 61/72/62/61."""
    members = round_half_up(cfg.member_fraction * n)
    nonmembers = n - members
    member_aux = round_half_up(cfg.member_aux_fraction * members)
    nonmember_aux = round_half_up(cfg.nonmember_aux_fraction * nonmembers)
    return {"member_aux": member_aux, "member_test": members - member_aux,
            "nonmember_aux": nonmember_aux, "nonmember_test": nonmembers - nonmember_aux}


@dataclass(frozen=True)
class Manifest:
    roles: dict[str, str]  # example id -> role
    seed: int
    dataset: str
    dataset_hash: str
    proportions: dict[str, float]

    def ids(self, *roles: str) -> list[str]:
        """Example ids with any of `roles`, in the dataset's order."""
        wanted = set(roles)
        return [i for i, r in self.roles.items() if r in wanted]

    @property
    def members(self) -> list[str]:
        return self.ids(*MEMBER_ROLES)

    def counts(self) -> dict[str, int]:
        return {role: len(self.ids(role)) for role in ROLES}

    def to_json(self) -> dict:
        return {"version": 1, "dataset": self.dataset, "dataset_hash": self.dataset_hash,
                "seed": self.seed, "proportions": self.proportions, "counts": self.counts(),
                "roles": self.roles}


def build_manifest(ids: list[str], dataset: str, dataset_hash: str, cfg: MembershipConfig) -> Manifest:
    """Assigns roles by a seeded permutation of `ids`.

    Raises:
        DataError: too few examples for every role to be non-empty.
    """
    counts = role_counts(len(ids), cfg)
    if min(counts.values()) < 1:
        raise DataError(f"dataset '{dataset}' has {len(ids)} examples: too few for a membership "
                        f"manifest (every role needs at least one example; got {counts})")
    order = np.random.default_rng(derive_seed(cfg.seed, "membership", dataset_hash)).permutation(len(ids))
    assigned: dict[str, str] = {}
    start = 0
    for role in ROLES:
        for k in order[start:start + counts[role]]:
            assigned[ids[k]] = role
        start += counts[role]
    roles = {i: assigned[i] for i in ids}  # dataset order, for readable diffs
    proportions = {"member_fraction": cfg.member_fraction, "member_aux_fraction": cfg.member_aux_fraction,
                   "nonmember_aux_fraction": cfg.nonmember_aux_fraction}
    return Manifest(roles=roles, seed=cfg.seed, dataset=dataset, dataset_hash=dataset_hash,
                    proportions=proportions)


def load_manifest(path: Path, dataset_hash: str | None = None) -> Manifest:
    """Reads `membership.json`; checks it belongs to the dataset with `dataset_hash` when given.

    Raises:
        DataError: unreadable, malformed, or made for other data.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        manifest = Manifest(roles=dict(data["roles"]), seed=int(data["seed"]), dataset=str(data["dataset"]),
                            dataset_hash=str(data["dataset_hash"]), proportions=dict(data["proportions"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a valid membership manifest ({type(err).__name__}: {err})") from None
    bad = sorted(set(manifest.roles.values()) - set(ROLES))
    if bad:
        raise DataError(f"{path}: unknown role '{bad[0]}'")
    if dataset_hash is not None and manifest.dataset_hash != dataset_hash:
        raise DataError(f"{path}: manifest was made for different data (dataset hash differs)")
    return manifest
