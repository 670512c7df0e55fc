"""The contract every registered membership attack keeps (LiRA included, its shadows given through
`fit`): one finite score per example, the same scores under the same seed, and scores that do not
depend on the order in which the examples are given."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privdiff.audit.attacks import ATTACKS, ShadowSet
from privdiff.audit.model import Candidates, Denoiser
from privdiff.errors import ConfigError
from privdiff.models.tiny import build_scheduler
from tests.audit.test_attacks import OptimalDenoiser, toy


@pytest.fixture(scope="module")
def world():
    """A memorising denoiser of 20 members, 10 + 10 aux examples, 8 + 8 to score, two shadows."""
    scheduler = build_scheduler()
    members, others = toy(20, 11), toy(20, 12)
    model = Denoiser(OptimalDenoiser(members.latents, scheduler.alphas_cumprod), scheduler)
    aux_members, aux_nonmembers = members.take(range(10)), others.take(range(10))
    examples = Candidates.join(members.take(range(12, 20)), others.take(range(12, 20)))
    half = set(members.ids[:10]) | set(others.ids[:10])
    rest = set(members.ids[10:]) | set(others.ids[10:])
    shadow_models = [Denoiser(OptimalDenoiser(torch.cat([members.latents[:10], others.latents[:10]]),
                                              scheduler.alphas_cumprod), scheduler),
                     Denoiser(OptimalDenoiser(torch.cat([members.latents[10:], others.latents[10:]]),
                                              scheduler.alphas_cumprod), scheduler)]
    shadows = ShadowSet(models=shadow_models, in_ids=[half, rest])
    base = Denoiser(OptimalDenoiser(others.latents, scheduler.alphas_cumprod), scheduler)  # "before fine-tuning"
    return model, aux_members, aux_nonmembers, examples, shadows, base


def fitted_attack(name: str, world, seed: int = 0):
    model, aux_members, aux_nonmembers, _, shadows, base = world
    attack = ATTACKS.get(name)(seed=seed)
    if name == "proxy":
        attack.max_epochs = 3  # the contract, not the attack's strength
    attack.fit(model, aux_members, aux_nonmembers, shadows=shadows if attack.needs_shadows else None,
               base=base if attack.needs_base else None)
    return attack


def test_the_registry_holds_every_attack_and_what_each_needs():
    assert set(ATTACKS) == {"loss", "pia", "secmi", "sima", "proxy", "lira-online", "lira-offline", "rmia",
                            "rmia-offline", "quantile"}
    assert {name for name in ATTACKS if ATTACKS.get(name).needs_shadows} == {"lira-online", "lira-offline", "rmia",
                                                                            "rmia-offline"}
    assert {name for name in ATTACKS if ATTACKS.get(name).needs_base} == {"quantile"}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_scores_are_finite_deterministic_and_independent_of_order(name: str, world):
    model, _, _, examples, _, _ = world
    attack = fitted_attack(name, world)
    scores = attack.score(model, examples)
    assert scores.shape == (len(examples),) and np.isfinite(scores).all()
    again = fitted_attack(name, world).score(model, examples)
    assert np.array_equal(scores, again)  # same seed, same scores
    order = np.random.default_rng(0).permutation(len(examples))
    shuffled = attack.score(model, examples.take(order))
    assert np.allclose(shuffled, scores[order], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["lira-online", "rmia", "rmia-offline"])
def test_an_attack_that_needs_shadows_refuses_to_fit_without_them(name: str, world):
    model, aux_members, aux_nonmembers, _, _, _ = world
    with pytest.raises(ConfigError, match="needs shadow models"):
        ATTACKS.get(name)(seed=0).fit(model, aux_members, aux_nonmembers)


def test_the_quantile_attack_refuses_to_fit_without_the_base_model(world):
    model, aux_members, aux_nonmembers, _, _, _ = world
    with pytest.raises(ConfigError, match="needs the base model"):
        ATTACKS.get("quantile")(seed=0).fit(model, aux_members, aux_nonmembers)
