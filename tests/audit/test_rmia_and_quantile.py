"""RMIA and the quantile attack against known answers, the nested shadow masks they share with
LiRA, and the FPR resolution rule (issue 31)."""

from __future__ import annotations

import numpy as np
import pytest

from privdiff.audit.attacks import (
    QuantileRegressionAttack,
    RMIAOffline,
    RMIAOnline,
    ShadowSet,
)
from privdiff.audit.attacks.base import reference_set
from privdiff.audit.model import Candidates, Denoiser
from privdiff.audit.roc import auc, fpr_resolution, min_nonmembers, null_auc_sd
from privdiff.audit.shadows import balanced_masks
from privdiff.errors import ConfigError
from privdiff.models.tiny import build_scheduler
from tests.audit.test_attacks import DataIndependent, OptimalDenoiser, toy


@pytest.fixture(scope="module")
def world():
    """40 members, 40 non-members (half aux, half test each) and 4 memorising shadows trained on
    complementary halves of all 80."""
    scheduler = build_scheduler()
    members, others = toy(40, 21), toy(40, 22)
    pool = Candidates.join(members, others)
    masks = balanced_masks(4, len(pool), seed=0)
    shadows = ShadowSet(models=[Denoiser(OptimalDenoiser(pool.latents[m], scheduler.alphas_cumprod), scheduler)
                                for m in masks],
                        in_ids=[{pool.ids[k] for k in np.flatnonzero(m)} for m in masks])
    split = {"member_aux": members.take(range(20)), "member_test": members.take(range(20, 40)),
             "nonmember_aux": others.take(range(20)), "nonmember_test": others.take(range(20, 40))}
    target = Denoiser(OptimalDenoiser(members.latents, scheduler.alphas_cumprod), scheduler)
    return scheduler, split, shadows, target


def test_shadow_masks_come_in_complementary_pairs_so_every_even_prefix_is_balanced():
    masks = balanced_masks(8, 101, seed=3)
    for count in (2, 4, 6, 8):
        assert (masks[:count].sum(0) == count // 2).all()
    assert abs(int(masks[0].sum()) - 50) <= 1  # each shadow trains on half the pool


@pytest.mark.parametrize("attack_cls", [RMIAOnline, RMIAOffline])
def test_rmia_catches_a_memorising_model_and_not_the_blind_one(attack_cls, world):
    scheduler, split, shadows, target = world
    test = Candidates.join(split["member_test"], split["nonmember_test"])
    labels = np.r_[np.ones(20), np.zeros(20)]
    attack = attack_cls(seed=0)
    attack.fit(target, split["member_aux"], split["nonmember_aux"], shadows=shadows)
    assert auc(attack.score(target, test), labels) >= 0.95
    assert attack.fitted["signal"] in ("loss", "pia", "sima") and attack.fitted["population"] == 20
    assert (attack.fitted["a"] is None) == attack_cls.online
    blind = Denoiser(DataIndependent(), scheduler)
    attack = attack_cls(seed=0)
    attack.fit(blind, split["member_aux"], split["nonmember_aux"], shadows=shadows)
    assert abs(auc(attack.score(blind, test), labels) - 0.5) < 3 * null_auc_sd(20, 20)


def test_rmia_uses_the_requested_number_of_references(world):
    _, split, shadows, target = world
    online, offline = RMIAOnline(seed=0), RMIAOffline(seed=0)
    online.references, offline.references = 2, 1
    online.fit(target, split["member_aux"], split["nonmember_aux"], shadows=shadows)
    offline.fit(target, split["member_aux"], split["nonmember_aux"], shadows=shadows)
    assert online.fitted["references"] == 2 and len(online.shadows.models) == 2
    assert offline.fitted["references"] == 1 and len(offline.shadows.models) == 2  # one OUT per example
    assert online.queries_per_example() == online.signals[online.fitted["signal"]].queries_per_example() * 3
    with pytest.raises(ConfigError, match="need 8 shadows"):
        reference_set(shadows, 4, online=False)
    with pytest.raises(ConfigError, match="even"):
        reference_set(shadows, 3, online=True)


def test_rmia_scores_are_fractions_of_the_population_with_ties_broken(world):
    _, split, shadows, target = world
    attack = RMIAOnline(seed=0)
    attack.fit(target, split["member_aux"], split["nonmember_aux"], shadows=shadows)
    scores = attack.score(target, Candidates.join(split["member_test"], split["nonmember_test"]))
    fractions = np.floor(scores * 20 + 1e-9) / 20
    assert ((0 <= fractions) & (fractions <= 1)).all() and (scores - fractions < 1 / 20).all()
    assert len(np.unique(scores)) == len(scores)


def test_the_quantile_attack_needs_no_member_and_no_shadow(world):
    scheduler, split, _, target = world
    public = toy(40, 23)
    base = Denoiser(OptimalDenoiser(public.latents, scheduler.alphas_cumprod), scheduler)
    test = Candidates.join(split["member_test"], split["nonmember_test"])
    labels = np.r_[np.ones(20), np.zeros(20)]
    attack = QuantileRegressionAttack(seed=0)
    empty = split["member_aux"].take([])  # no member example is needed to fit
    attack.fit(target, empty, split["nonmember_aux"], base=base)
    assert auc(attack.score(target, test), labels) >= 0.95
    assert attack.fitted["n_fit"] == 20 and attack.fitted["aux_nonmember_exceedance"] <= 0.1
    assert attack.queries_per_example() == 2 * 4 * 4
    unchanged = QuantileRegressionAttack(seed=0)  # control: the target is the base model itself
    unchanged.fit(base, empty, split["nonmember_aux"], base=base)
    assert abs(auc(unchanged.score(base, test), labels) - 0.5) < 3 * null_auc_sd(20, 20)


def test_fpr_resolution_follows_the_spec_rule():
    assert [min_nonmembers(a) for a in (0.05, 0.01, 0.001)] == [20, 100, 1000]
    res = fpr_resolution(233)
    assert res["0.05"]["resolved"] and res["0.01"]["resolved"] and not res["0.001"]["resolved"]
    assert not fpr_resolution(99)["0.01"]["resolved"] and fpr_resolution(1000)["0.001"]["resolved"]
