"""Attacks by an honest-but-curious (or, for FSHA, malicious) server on split learning (split-controlnet.md §9).

Every attack implements `SplitAttack` (`fit` on public data, `engage` with the victim's training,
`reconstruct` from one observation), is registered in `SPLIT_ATTACKS` under its CLI name, and is
scored by `scoring.score`. Importing this package registers every one of them.
"""

from __future__ import annotations

from privdiff.split.attacks.analytic import AnalyticAttack
from privdiff.split.attacks.base import SPLIT_ATTACKS, SplitAttack
from privdiff.split.attacks.fsha import FSHAAttack
from privdiff.split.attacks.inverse import InverseNetworkAttack
from privdiff.split.attacks.unsplit import UnSplitAttack

attack_class = SPLIT_ATTACKS.get

__all__ = ["AnalyticAttack", "FSHAAttack", "InverseNetworkAttack", "SPLIT_ATTACKS", "SplitAttack", "UnSplitAttack",
           "attack_class"]
