"""Attacks by an honest-but-curious (or, for FSHA, malicious) server on split learning (spec §9).

Every attack implements `SplitAttack` (`fit` on public data, `reconstruct` from one observation) and
is scored by `scoring.score`; `ATTACKS` maps the CLI names to their modules, imported on demand.
"""

from __future__ import annotations

import importlib

from privdiff.errors import ConfigError

ATTACKS = {
    "analytic": "privdiff.split.attacks.analytic:AnalyticAttack",
    "inverse-network": "privdiff.split.attacks.inverse:InverseNetworkAttack",
    "unsplit": "privdiff.split.attacks.unsplit:UnSplitAttack",
    "fsha": "privdiff.split.attacks.fsha:FSHAAttack",
}


def attack_class(name: str):
    """The attack class registered under `name` (ConfigError for an unknown one)."""
    if name not in ATTACKS:
        raise ConfigError(f"unknown split attack '{name}' (choose {', '.join(ATTACKS)})")
    module, cls = ATTACKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["ATTACKS", "attack_class"]
