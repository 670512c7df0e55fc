"""The roles' contracts (split-controlnet.md §13 items 1–3, 12) on the tiny test pipeline."""

from __future__ import annotations

import torch

from privdiff.split.messages import encode, parse
from privdiff.split.run import build_simulation, train_rounds
from privdiff.split.server import Batch
from tests.split.conftest import split_config


def _batches(transport, server):
    replies = transport.exchange(server.requests())
    return [server.receive(item, cid) for cid, item in replies]


def test_backward_free_client_is_frozen_forward_only(tiny_pipeline_dir, public_models, monkeypatch, tmp_path):
    server, transport = build_simulation(split_config(tiny_pipeline_dir), public_models)
    client = transport.clients["client-0"]
    calls = {"n": 0}
    real_backward = torch.autograd.backward

    def counting_backward(*args, **kwargs):
        calls["n"] += 1
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "backward", counting_backward)
    grad_before = torch.is_grad_enabled()
    for _ in range(3):
        message = client.forward(0, 4)
    assert calls["n"] == 0
    assert torch.is_grad_enabled() == grad_before
    modules = (public_models.vae, public_models.text_encoder, public_models.unet)
    assert not any(p.requires_grad for m in modules for p in m.parameters())
    assert not any(isinstance(v, torch.optim.Optimizer) for v in vars(client).values())
    assert set(message.tensors) == {"h", "s0", "t", "target"}
    # the server's step does call backward: the counter sees it (the check is live)
    batches = _batches(transport, server)
    server.train_step(batches)
    assert calls["n"] == 1


def test_server_trains_only_the_controlnet_minus_hint_and_leaves_frozen_weights(tiny_pipeline_dir, public_models, tmp_path):
    server, transport = build_simulation(split_config(tiny_pipeline_dir), public_models)
    in_optimizer = {id(p) for group in server.optimizer.param_groups for p in group["params"]}
    named = dict(server.controlnet.named_parameters())
    expected = {id(p) for n, p in named.items() if not n.startswith("controlnet_cond_embedding.")}
    assert in_optimizer == expected
    frozen = {f"{m}.{k}": v.clone() for m in ("unet", "vae", "text_encoder")
              for k, v in getattr(public_models, m).state_dict().items()}
    hint = {k: v.clone() for k, v in server.controlnet.controlnet_cond_embedding.state_dict().items()}
    before = {k: v.clone() for k, v in server.controlnet.state_dict().items()}
    train_rounds(server, transport, tmp_path, steps=3, checkpoint_every=100)
    after_frozen = {f"{m}.{k}": v for m in ("unet", "vae", "text_encoder")
                    for k, v in getattr(public_models, m).state_dict().items()}
    assert all(torch.equal(frozen[k], after_frozen[k]) for k in frozen)
    assert all(torch.equal(v, server.controlnet.controlnet_cond_embedding.state_dict()[k]) for k, v in hint.items())
    moved = [k for k, v in server.controlnet.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("controlnet_down_blocks") for k in moved)


def _centralised_backward_free(server, models, batch, draws_h, x_t):
    controlnet = server.controlnet
    context = torch.zeros((x_t.shape[0], *models.text_shape))
    t = torch.from_numpy(batch.tensors["t"])
    # the ordinary diffusers forwards: ControlNet on h with its (never trained, zero-output) hint
    # block fed a condition image, UNet from x_t through its own conv_in
    condition = torch.rand(x_t.shape[0], 3, 4 * x_t.shape[-2], 4 * x_t.shape[-1])
    down, mid = controlnet(draws_h, t, encoder_hidden_states=context, controlnet_cond=condition, return_dict=False)
    prediction = models.unet(x_t, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid).sample
    return torch.nn.functional.mse_loss(prediction, torch.from_numpy(batch.tensors["target"]))


def test_split_step_equals_centralised_backward_free(tiny_pipeline_dir, public_models):
    server, transport = build_simulation(split_config(tiny_pipeline_dir), public_models)
    client = transport.clients["client-0"]
    # give the zero convolutions some weight so that the gradients reach every ControlNet layer
    with torch.no_grad():
        for p in server.controlnet.controlnet_down_blocks.parameters():
            p.normal_(0, 0.05)
    state = client.state_dict()
    draws = client._draw(1, 0, 4)
    client.load_state_dict(state)
    batch = Batch("client-0", client.forward(0, 4).tensors)
    loss_split, _ = server.loss([batch])
    grads_split = torch.autograd.grad(loss_split, server.trainable)
    h = torch.from_numpy(batch.tensors["h"]).float()
    loss_central = _centralised_backward_free(server, public_models, batch, h, draws.x_t)
    grads_central = torch.autograd.grad(loss_central, server.trainable)
    assert abs(loss_split.item() - loss_central.item()) <= 1e-6 * max(1.0, abs(loss_central.item()))
    for a, b in zip(grads_split, grads_central):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(b.abs().max())))
    assert torch.equal(torch.from_numpy(batch.tensors["s0"]), public_models.unet.conv_in(draws.x_t).detach())


def test_split_step_equals_centralised_vanilla(tiny_pipeline_dir, public_models):
    config = split_config(tiny_pipeline_dir, "protocol.design=vanilla")
    server, transport = build_simulation(config, public_models)
    client = transport.clients["client-0"]
    with torch.no_grad():
        for p in [*server.controlnet.controlnet_down_blocks.parameters(),
                  client.hint.conv_out.weight]:
            p.normal_(0, 0.05)
    state = client.state_dict()
    draws = client._draw(1, 0, 4)
    context = client._text(draws.indices)
    client.load_state_dict(state)
    reply = client.forward(0, 4)
    assert set(reply.tensors) == {"control", "s0", "t", "text_embedding", "target"}
    batch = Batch("client-0", reply.tensors)
    # centralised: one ControlNet holding the client's conv_in and hint block, ordinary forwards
    central = type(server.controlnet).from_config(server.controlnet.config)
    central.load_state_dict(server.controlnet.state_dict())
    central.conv_in.load_state_dict(client.conv_in.state_dict())
    central.controlnet_cond_embedding.load_state_dict(client.hint.state_dict())
    t = torch.from_numpy(batch.tensors["t"])
    down, mid = central(draws.x_t, t, encoder_hidden_states=context, controlnet_cond=draws.conditions,
                        return_dict=False)
    prediction = public_models.unet(draws.x_t, t, encoder_hidden_states=context,
                                    down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    loss_central = torch.nn.functional.mse_loss(prediction, draws.noise)
    loss_central.backward()
    result = server.train_step([batch])
    assert abs(result.loss - float(loss_central)) <= 1e-6 * max(1.0, float(loss_central))
    central_named = dict(central.named_parameters())
    # server gradients (read before its optimiser zeroes them next time)
    for name, param in server.controlnet.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, central_named[name].grad, rtol=1e-5, atol=1e-7), name
    # the pushed gradient, applied by the client, reproduces the hint block's centralised gradient
    push = result.pushes[0]
    received = parse(encode(push), 1 << 26)
    hint_before = {k: v.clone() for k, v in client.hint.state_dict().items()}
    client.optimizer.step = lambda: None  # keep .grad for inspection
    client.apply_gradient(received)
    for name, param in client.hint.named_parameters():
        assert torch.allclose(param.grad, central_named[f"controlnet_cond_embedding.{name}"].grad,
                              rtol=1e-5, atol=1e-7), name
    for name, param in client.conv_in.named_parameters():
        assert torch.allclose(param.grad, central_named[f"conv_in.{name}"].grad, rtol=1e-5, atol=1e-7), name
    assert all(torch.equal(v, client.hint.state_dict()[k]) for k, v in hint_before.items())


def test_vanilla_rounds_update_the_client_part(tiny_pipeline_dir, public_models, tmp_path):
    server, transport = build_simulation(split_config(tiny_pipeline_dir, "protocol.design=vanilla"), public_models)
    client = transport.clients["client-1"]
    before = [p.detach().clone() for p in client.trainable.parameters()]
    train_rounds(server, transport, tmp_path, steps=2, checkpoint_every=100)
    assert any(not torch.equal(a, b) for a, b in zip(before, client.trainable.parameters()))
    assert transport.bytes_by("down", "gradient.push") > 0


def test_server_kill_and_resume_reproduces_the_uninterrupted_controlnet(tiny_pipeline_dir, public_models, tmp_path):
    config = split_config(tiny_pipeline_dir)
    straight, transport_a = build_simulation(config, public_models)
    train_rounds(straight, transport_a, tmp_path / "a", steps=4, checkpoint_every=2)
    keys = straight.validator.keys

    first, transport_b = build_simulation(config, public_models, keys)  # same clients, same streams
    train_rounds(first, transport_b, tmp_path / "b", steps=2, checkpoint_every=2)
    del first  # "killed" right after its checkpoint at step 2
    resumed, _ = build_simulation(config, public_models, keys)
    assert resumed.load_checkpoint(tmp_path / "b") and resumed.step == 2
    train_rounds(resumed, transport_b, tmp_path / "b", steps=4, checkpoint_every=2)
    for (name, a), b in zip(straight.controlnet.state_dict().items(), resumed.controlnet.state_dict().values()):
        assert torch.equal(a, b), name
    def without_time(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert without_time(resumed.log) == without_time(straight.log)
