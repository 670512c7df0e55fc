"""FSHA, the malicious vanilla server (split-controlnet.md §9.4, §13 item 13), on the tiny test
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
from privdiff.split.attacks.scoring import per_example, specificity
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
from tests.split.nulls import mean_rank, paired_sign, retrieval

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
    """split-controlnet.md §13 item 13, on design A at the default client learning rate (~70 s on one core).

    The GAN swings pixel MSE and SSIM from round to round (at round 100 MSE ranged 0.014–0.048 over 14
    seeds against a no-information baseline of 0.027, so an MSE margin passed on one CPU and failed on
    another). What is asserted are tests against the null of an attacker without information
    (tests/split/nulls.py, one-sided, level 1e-3 each), on the same 32 held-out victims at rounds 0
    and 100 (the reconstructions the attack scored, recorded as it scores them):

    - round 0: the hint block's zero conv gives every victim the same reconstruction, and neither
      the retrieval count nor the mean rank of the own condition departs from the null (a negative
      control of both checks);
    - round 100: the reconstructions find their own victims, top-1 retrieval beyond Binomial(32, 1/32)
      (count > 5; the 14 seeds measured 6 to 32) and a mean rank of the own condition below
      16.5 − 3.09 · sqrt(33 / 12) = 11.4;
    - SSIM rises victim by victim from round 0 to round 100, and beats the no-information baseline
      victim by victim (sign tests against Binomial(32, 1/2): count > 25). Round 0 already beats the
      baseline (a uniform dark outline against the mean condition); the rise is what the attack adds.
    """
    config = split_config(tiny_pipeline_dir, *VICTIM, "data.test_examples=32")
    attack = FSHAAttack(batch_size=16, critic_pretrain_steps=100)
    attack.fit(AttackData(config, public_models, public_triples(config, 256)))
    truths: list[torch.Tensor] = []  # the true and the reconstructed conditions, as the attack scores them
    reconstructions: list[torch.Tensor] = []
    held_out, reconstruct = attack.held_out, attack.reconstruct

    def recording_held_out(*args, **kwargs):
        observation, truth = held_out(*args, **kwargs)
        truths.append(truth.conditions)
        return observation, truth

    def recording_reconstruct(observation):
        reconstruction = reconstruct(observation)
        reconstructions.append(reconstruction.conditions)
        return reconstruction

    attack.held_out, attack.reconstruct = recording_held_out, recording_reconstruct
    server, transport = build_simulation(config, public_models)
    result = attack.attack(server, transport, 100, every=50, holdout=load_triples(config, test=True), count=32)
    assert [row["round"] for row in result["history"]] == [0, 50, 100] and len(reconstructions) == 3
    assert not server.validator.refusals
    truth, first, last = truths[0], reconstructions[0], reconstructions[-1]
    assert all(torch.equal(t, truth) for t in truths)  # the same victims at every round
    public = torch.from_numpy(np.stack([ex.conditioning for ex in attack.data.public.examples]))
    baseline = (public.permute(0, 3, 1, 2).float() / 255).mean(0, keepdim=True).expand(len(truth), -1, -1, -1)
    ssim = {name: per_example(guess, truth)["ssim"] for name, guess in
            (("first", first), ("last", last), ("baseline", baseline))}

    # round 0: one reconstruction for all, which no check mistakes for a read
    assert torch.allclose(first, first[:1].expand_as(first), atol=1e-6)
    chance = [retrieval(first, truth), mean_rank(first, truth)]
    assert not any(check.rejects for check in chance), [str(check) for check in chance]
    # round 100: specific to each victim, and better than round 0 and than the baseline, victim by victim
    checks = [retrieval(last, truth), mean_rank(last, truth),
              paired_sign(ssim["last"], ssim["first"], "victims better than at round 0"),
              paired_sign(ssim["last"], ssim["baseline"], "victims better than the baseline")]
    assert all(check.rejects for check in checks), [str(check) for check in checks]


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
