"""Attacks against known answers: the exact optimal denoiser of the members memorises them
(membership-audit.md §9.4-7)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from privdiff.audit.attacks import ATTACKS, PIA, LossThreshold, SecMIStat, SimA
from privdiff.audit.attacks.gray_box import ddim_step
from privdiff.audit.model import Candidates, Denoiser
from privdiff.audit.roc import auc
from privdiff.audit.run import AuditConfig, evaluate_attack
from privdiff.models.tiny import build_scheduler


class OptimalDenoiser(torch.nn.Module):
    """ε*(x_t, t) = (x_t - sqrt(ᾱ_t) Σ w_i x_i) / sqrt(1 - ᾱ_t), w = softmax_i(-||x_t - sqrt(ᾱ_t) x_i||² / 2(1 - ᾱ_t))."""

    def __init__(self, members: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.members = members.double()
        self.alphas = alphas_cumprod.double()

    def forward(self, x_t, t, encoder_hidden_states=None):
        a = self.alphas[t.long()].view(-1, 1)
        flat, mem = x_t.double().flatten(1), self.members.flatten(1)
        dist = ((flat[:, None, :] - a.sqrt()[:, :, None] * mem[None]) ** 2).sum(-1)
        w = torch.softmax(-dist / (2 * (1 - a)), dim=1)
        eps = (flat - a.sqrt() * (w @ mem)) / (1 - a).sqrt()
        return SimpleNamespace(sample=eps.view_as(x_t).float())


class DataIndependent(torch.nn.Module):
    def forward(self, x_t, t, encoder_hidden_states=None):
        return SimpleNamespace(sample=0.5 * x_t + 0.01 * t.float().view(-1, 1, 1, 1))


def toy(n: int, seed: int) -> Candidates:
    g = torch.Generator().manual_seed(seed)
    latents = 3.0 * torch.randn(n, 4, 2, 2, generator=g)  # well separated in 16 dimensions
    return Candidates([f"toy-{seed}-{i}" for i in range(n)], latents, torch.zeros(n, 1, 4))


@pytest.fixture(scope="module")
def split():
    members, others = toy(60, 1), toy(60, 2)
    aux_m, test_m = members.take(range(30)), members.take(range(30, 60))
    aux_n, test_n = others.take(range(30)), others.take(range(30, 60))
    return members, aux_m, test_m, aux_n, test_n


@pytest.mark.parametrize("attack_cls", [LossThreshold, PIA, SimA, SecMIStat])
def test_optimal_denoiser_is_caught_and_a_data_independent_one_is_not(attack_cls, split):
    members, aux_m, test_m, aux_n, test_n = split
    scheduler = build_scheduler()
    labels = np.r_[np.ones(30), np.zeros(30)]
    test = Candidates.join(test_m, test_n)
    memorising = Denoiser(OptimalDenoiser(members.latents, scheduler.alphas_cumprod), scheduler)
    attack = attack_cls(seed=0)
    attack.fit(memorising, aux_m, aux_n)
    assert auc(attack.score(memorising, test), labels) >= 0.99
    blind = Denoiser(DataIndependent(), scheduler)
    attack = attack_cls(seed=0)
    attack.fit(blind, aux_m, aux_n)
    assert abs(auc(attack.score(blind, test), labels) - 0.5) < 0.2  # null sd at 30 + 30 is 0.075


def test_secmi_round_trip_with_a_constant_denoiser_and_its_query_count():
    class Constant(torch.nn.Module):
        def forward(self, x_t, t, encoder_hidden_states=None):
            return SimpleNamespace(sample=torch.full_like(x_t, 0.3))

    model = Denoiser(Constant(), build_scheduler())
    x = torch.randn(5, 4, 2, 2)
    eps = torch.full_like(x, 0.3)
    back = ddim_step(model, ddim_step(model, x, 40, 50, eps), 50, 40, eps)
    assert (back - x).abs().max() < 1e-6
    attack = SecMIStat(seed=0)
    before = model.queries
    scores = attack.score_at(model, Candidates([f"c{i}" for i in range(5)], x, torch.zeros(5, 1, 4)), 100)
    assert (model.queries - before) / 5 == 100 // 10 + 1 == attack.queries_per_example()
    assert np.allclose(scores, 0.0, atol=1e-8)  # a constant prediction inverts exactly


def test_fixed_noises_are_identical_across_models(split):
    _, aux_m, _, _, _ = split
    seen = {}
    for name, net in (("a", DataIndependent()), ("b", OptimalDenoiser(aux_m.latents, build_scheduler().alphas_cumprod))):
        inputs = []
        net.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
        LossThreshold(seed=3).score_at(Denoiser(net, build_scheduler()), aux_m, 100)
        seen[name] = torch.cat(inputs)
    assert torch.equal(seen["a"], seen["b"])


@pytest.mark.parametrize("name", ["loss", "pia", "sima", "secmi", "proxy"])
def test_fit_never_looks_at_the_test_split(name, split):
    """The fitted parameters are the same whatever the test split holds."""
    members, aux_m, test_m, aux_n, test_n = split
    scheduler = build_scheduler()
    model = Denoiser(OptimalDenoiser(members.latents, scheduler.alphas_cumprod), scheduler)
    cfg = AuditConfig(bootstrap=20)
    fitted = []
    for seed in (7, 8):
        other = toy(30, seed)
        data = {"member_aux": aux_m, "nonmember_aux": aux_n, "member_test": test_m,
                "nonmember_test": Candidates(test_n.ids, other.latents, other.contexts)}
        attack = ATTACKS[name](seed=0)
        if name == "proxy":
            attack.max_epochs = 5
        fitted.append(evaluate_attack(attack, model, data, cfg)["record"]["fitted"])
    assert fitted[0] == fitted[1]
