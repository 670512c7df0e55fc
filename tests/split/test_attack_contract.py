"""The interface every registered split-learning attack keeps: registered under its CLI name, a
declared set of designs it reads, and the three phases (`fit`, `engage`, `reconstruct`). Only a
malicious server engages the victim's training (FSHA); every other attack passes that phase."""

from __future__ import annotations

import pytest

from privdiff.split.attacks import SPLIT_ATTACKS, SplitAttack
from privdiff.split.config import DESIGNS


def test_the_registry_holds_the_four_attacks_under_their_cli_names():
    assert set(SPLIT_ATTACKS) == {"analytic", "inverse-network", "unsplit", "fsha"}
    assert all(SPLIT_ATTACKS.get(name).name == name for name in SPLIT_ATTACKS)


@pytest.mark.parametrize("name", sorted(SPLIT_ATTACKS))
def test_every_attack_has_the_three_phases_and_reads_known_designs(name: str):
    cls = SPLIT_ATTACKS.get(name)
    assert issubclass(cls, SplitAttack) and set(cls.designs) <= set(DESIGNS) and cls.designs
    for phase in ("fit", "engage", "reconstruct"):
        assert callable(getattr(cls, phase))
    engages = cls.engage is not SplitAttack.engage
    assert engages == (name == "fsha")  # only the malicious server acts before the observation
    if not engages:
        assert cls().engage(observer=None) is None
