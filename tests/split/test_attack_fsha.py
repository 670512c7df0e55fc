"""FSHA, the malicious vanilla server (split-controlnet spec §9.4, §13 item 13), on the tiny test
pipeline: the hijack runs over the real protocol, its reconstruction rises over rounds, and the
backward-free client has no channel for it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privdiff.errors import ConfigError
from privdiff.split.attacks import attack_class
from privdiff.split.attacks.base import AttackData, Observer, public_triples
from privdiff.split.attacks.fsha import FSHAAttack
from privdiff.split.attacks.scoring import specificity
from privdiff.split.client import ProtocolError
from privdiff.split.messages import (
    FORWARD_REQUEST,
    GRADIENT_PUSH,
    Message,
    encode,
    parse,
)
from privdiff.split.run import build_simulation
from privdiff.split.setup import load_triples
from tests.split.conftest import split_config

# The rising test's victim: one client at the default client learning rate (1e-4).
VICTIM = ("protocol.design=vanilla", "train.clients=1", "train.request_size=16", "data.num_examples=64")


pytestmark = pytest.mark.usefixtures("one_thread")


def _quick_attack(config, models, **overrides) -> FSHAAttack:
    attack = FSHAAttack(**{"pretrain_steps": 2, "critic_pretrain_steps": 2, **overrides})
    attack.fit(AttackData(config, models, public_triples(config, 32)))
    return attack


def test_registered_and_refuses_a_backward_free_config(tiny_pipeline_dir, public_models):
    assert attack_class("fsha") is FSHAAttack
    config = split_config(tiny_pipeline_dir)  # design B, the default
    with pytest.raises(ConfigError, match="protocol.design=vanilla") as error:
        FSHAAttack().fit(AttackData(config, public_models, public_triples(config, 8)))
    assert "\n" not in str(error.value)
    vanilla = _quick_attack(split_config(tiny_pipeline_dir, "protocol.design=vanilla"), public_models)
    server, transport = build_simulation(config, public_models)
    with pytest.raises(ConfigError, match="protocol.design=vanilla"):
        vanilla.round(server, transport)


def test_backward_free_client_never_consumes_a_server_tensor(tiny_pipeline_dir, public_models):
    server, transport = build_simulation(split_config(tiny_pipeline_dir), public_models)
    client = transport.clients["client-0"]
    transport.exchange(server.requests())  # a forward is out, as a vanilla client would await its gradient
    before = client.state_dict()
    latent = public_models.latent_shape(32)
    shape = (4, public_models.stem_channels, *latent[1:])
    push = Message(GRADIENT_PUSH, "client-0", 0, 0, tensors={"gradient": np.ones(shape, np.float32)})
    received = parse(encode(push), 1 << 30)
    loads = []
    load = received.load
    received.load = lambda name: loads.append(name) or load(name)
    with pytest.raises(ProtocolError, match="takes no gradients"):
        client.handle(received)
    assert loads == []  # not a byte of the tensor was read
    assert client.state_dict() == before
    with pytest.raises(ProtocolError):  # the same through the transport: refused, nothing acknowledged
        transport.push([push])
    assert client.state_dict() == before
    assert not [r for r in transport.records if r.type == "gradient.ack"]
    assert not any(isinstance(v, torch.optim.Optimizer) for v in vars(client).values())


def test_one_round_is_an_honest_looking_gradient_push(tiny_pipeline_dir, public_models):
    config = split_config(tiny_pipeline_dir, "protocol.design=vanilla")
    attack = _quick_attack(config, public_models)
    server, transport = build_simulation(config, public_models)
    clients = transport.clients
    before = {cid: [p.detach().clone() for p in c.trainable.parameters()] for cid, c in clients.items()}
    controlnet = {k: v.clone() for k, v in server.controlnet.state_dict().items()}
    row = attack.round(server, transport)
    assert row["clients"] == sorted(clients) and not server.validator.refusals and server.round == 1
    pushes = [parse(r.payload, 1 << 30) for r in transport.records if r.type == GRADIENT_PUSH]
    expected = (config.train.request_size, public_models.stem_channels, *public_models.latent_shape(32)[1:])
    assert len(pushes) == len(clients)
    for push in pushes:
        assert set(push.specs) == {"gradient"} and push.specs["gradient"].dtype == "float32"
        assert push.specs["gradient"].shape == expected and push.header["round"] == 0
    assert [r.type for r in transport.records].count("gradient.ack") == len(clients)
    for cid, client in clients.items():  # each client stepped its own optimizer on the push
        assert client.pending is None
        assert any(not torch.equal(a, b) for a, b in zip(before[cid], client.trainable.parameters()))
    assert all(torch.equal(v, server.controlnet.state_dict()[k]) for k, v in controlnet.items())
    assert transport.records[0].type == FORWARD_REQUEST


def test_feature_removes_the_conv_in_drift(tiny_pipeline_dir, public_models):
    """At initialisation hint(c) = 0 (zero conv_out), so once conv_in' is moved by (ΔW, Δb) the client
    sends control − s0 = ΔW∗x_t + Δb: the feature must be Δb alone."""
    config = split_config(tiny_pipeline_dir, "protocol.design=vanilla")
    attack = _quick_attack(config, public_models)
    observer = Observer(config, public_models, load_triples(config, test=True), secret_seed=3)
    conv = observer.client.conv_in
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        conv.weight.add_(0.1 * torch.randn(conv.weight.shape, generator=g))
        conv.bias.add_(torch.randn(conv.bias.shape, generator=g))
    observation, _ = observer.next(8)
    raw = observation.tensors["control"] - observation.tensors["s0"]
    bias = (conv.bias - public_models.unet.conv_in.bias).detach().view(1, -1, 1, 1)
    assert (raw - bias).abs().max() > 0.1  # the drift is there ...
    assert torch.allclose(attack.feature(observation.tensors), bias.expand_as(raw), atol=1e-4)  # ... and gone


def test_image_latent_is_the_clients_z0(tiny_pipeline_dir, public_models):
    config = split_config(tiny_pipeline_dir, "protocol.design=vanilla")
    attack = _quick_attack(config, public_models)
    observation, truth = Observer(config, public_models, load_triples(config, test=True), secret_seed=3).next(8)
    z0 = attack.image_latent(observation.tensors)
    assert float((z0 - truth.z0).norm() / truth.z0.norm()) < 1e-3


@pytest.mark.slow
def test_fsha_reconstruction_rises_over_rounds(tiny_pipeline_dir, public_models):
    """Spec §13 item 13, on design A at the default client learning rate (~70 s on one core).

    What is asserted is what held on each of 14 seeds (attack seed × data seed, measured): the GAN
    swings pixel MSE from round to round (at round 100 it ranged 0.014–0.048 against a no-information
    baseline of 0.027, so an MSE margin passed on one CPU and failed on another), while what is
    specific to each victim example rose in every run: retrieval among the 32 held-out conditions
    0.03 (chance) at round 0 → 0.19–1.0 at round 100, specific gain 0 → 0.009–0.049, SSIM +0.11 or
    more on round 0 and 0.37–0.78 against the baseline's 0.04.
    """
    config = split_config(tiny_pipeline_dir, *VICTIM, "data.test_examples=32")
    attack = FSHAAttack(batch_size=16, critic_pretrain_steps=100)
    attack.fit(AttackData(config, public_models, public_triples(config, 256)))
    server, transport = build_simulation(config, public_models)
    result = attack.attack(server, transport, 100, every=50, holdout=load_triples(config, test=True), count=32)
    first, last = result["history"][0], result["history"][-1]
    baseline_ssim = result["references"]["baseline"]["ssim"]["value"]
    assert [row["round"] for row in result["history"]] == [0, 50, 100]
    assert not server.validator.refusals
    # round 0: the hint block's zero conv gives every example the same feature, so nothing specific
    assert abs(first["specific_gain"]) < 1e-3 and first["retrieval"] <= 2 / 32, first
    # round 100: stated margins, each below the worst of the 14 measured seeds (retrieval: 4× chance)
    assert last["retrieval"] >= 4 / 32 and last["specific_gain"] > 0.004, last
    assert last["ssim"] > first["ssim"] + 0.05 and last["ssim"] > baseline_ssim + 0.25, (first, last, baseline_ssim)


def test_specificity_reads_only_what_belongs_to_each_example():
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(6, 3, 8, 8, generator=g)
    exact = specificity(truth, truth)
    assert exact["retrieval"] == 1.0 and exact["specific_gain"] > 0.1
    same = specificity(truth.mean(0, keepdim=True).expand(6, -1, -1, -1), truth)  # the same guess for all
    assert abs(same["specific_gain"]) < 1e-12
    duplicated = torch.cat([truth[:3], truth[:3]])  # a duplicate of the own condition counts as found
    assert specificity(duplicated, duplicated)["retrieval"] == 1.0
    assert specificity(truth.roll(1, 0), truth)["retrieval"] == 0.0


@pytest.mark.slow
def test_evaluate_attack_engages_the_victim_first(tiny_pipeline_dir, public_models):
    from privdiff.split.attacks.run import evaluate_attack

    config = split_config(tiny_pipeline_dir, "protocol.design=vanilla")
    attack = FSHAAttack(rounds=3, pretrain_steps=2, critic_pretrain_steps=2)
    outcome = evaluate_attack(attack, config, public_models, victims=8, public_examples=32)
    assert outcome.result["diagnostics"]["hijack_rounds"] == 3 and attack.engaged["refusals"] == {}
    assert set(outcome.result["scores"]) == {"condition"}
    assert outcome.reconstruction.conditions.shape == outcome.truth.conditions.shape
