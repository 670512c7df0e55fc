"""Malformed and hostile messages are refused with the right reason and never change training state
(split-controlnet.md §8.3 and §13 item 6)."""

from __future__ import annotations

import numpy as np

from privdiff.split.messages import Message, encode
from privdiff.split.run import build_simulation, train_rounds
from privdiff.split.transport import receive_bytes
from tests.split.conftest import split_config


def _valid(server, transport, cid="client-0"):
    """A fresh valid reply for the current round (the client's own forward)."""
    client = transport.clients[cid]
    return client.forward(server.round, 4).signed(client.key)


def _mutations(base: Message, key: bytes, rng: np.random.Generator, max_bytes: int):
    """(expected reason, payload) pairs, one per rule of split-controlnet.md §8.3, randomised."""
    def signed(**changes) -> bytes:
        tensors = {k: v.copy() for k, v in base.tensors.items()}
        tensors.update(changes.pop("tensors", {}))
        for name in changes.pop("drop", []):
            tensors.pop(name)
        fields = dict(type=base.type, client_id=base.client_id, round=base.round, seq=base.seq + 1 + int(rng.integers(1000)),
                      meta=dict(base.meta))
        fields.update(changes)
        sign_key = fields.pop("key", key)
        return encode(Message(tensors=tensors, **fields).signed(sign_key))

    b = base.tensors["h"].shape[0]
    kind = int(rng.integers(16))
    if kind == 0:
        return "too_large", b"PDSPLIT1" + bytes(max_bytes)
    if kind == 1:
        return "malformed", bytes(rng.integers(0, 256, int(rng.integers(0, 4096)), dtype=np.uint8))
    if kind == 2:
        good = signed()
        return "malformed", good[: int(rng.integers(16, len(good) - 1))]
    if kind == 3:
        return "version", encode(Message(**{**vars(base), "protocol_version": 2, "seq": base.seq + 1}).signed(key))
    if kind == 4:
        return "type", signed(type=str(rng.choice(["forward.request", "gradient.ack", "gradient.push", "x"])))
    if kind == 5:
        return "unknown_client", signed(client_id=f"mallory-{rng.integers(99)}", key=b"m" * 32)
    if kind == 6:
        payload = bytearray(signed())
        payload[-1 - int(rng.integers(64))] ^= 1 + int(rng.integers(255))  # flip tensor bytes after signing
        return "auth", bytes(payload)
    if kind == 7:
        return "auth", signed(key=bytes(rng.integers(0, 256, 32, dtype=np.uint8)))
    if kind == 8:
        return "round", signed(round=base.round + int(rng.choice([-1, 1, 7])))
    if kind == 9:
        if rng.random() < 0.5:
            return "tensor_names", signed(tensors={"image": np.zeros((b, 3, 32, 32), np.float32)})
        return "tensor_names", signed(drop=[str(rng.choice(["h", "s0", "t", "target"]))])
    if kind == 10:
        return "dtype", signed(tensors={"h": base.tensors["h"].astype(np.float32)})
    if kind == 11:
        name = str(rng.choice(["h", "s0", "target"]))
        array = base.tensors[name]
        return "shape", signed(tensors={name: np.zeros((b, *array.shape[1:-1], array.shape[-1] + 1), array.dtype)})
    if kind == 12:
        size = int(rng.choice([65, 80]))
        return "batch_size", signed(tensors={k: np.zeros((size, *v.shape[1:]), v.dtype) for k, v in base.tensors.items()})
    if kind == 13:
        name = str(rng.choice(["h", "s0", "target"]))
        array = base.tensors[name].copy()
        array.flat[int(rng.integers(array.size))] = rng.choice([np.nan, np.inf, -np.inf])
        return "non_finite", signed(tensors={name: array})
    if kind == 14:
        array = base.tensors["s0"].copy()
        array.flat[int(rng.integers(array.size))] = float(rng.choice([-1, 1])) * 1e5
        return "out_of_range", signed(tensors={"s0": array})
    t = base.tensors["t"].copy()
    t[int(rng.integers(b))] = int(rng.choice([0, 4, 1000, 2**40, -3]))
    return "timestep", signed(tensors={"t": t})


def test_fuzzed_messages_are_refused_and_training_continues(tiny_pipeline_dir, public_models, tmp_path):
    server, transport = build_simulation(split_config(tiny_pipeline_dir, "protocol.t_start=5"), public_models)
    train_rounds(server, transport, tmp_path, steps=1, checkpoint_every=1)
    base = _valid(server, transport)
    key = transport.clients["client-0"].key
    accepted = server.receive(receive_bytes(encode(base), server.max_message_bytes))
    assert accepted is not None  # the unmutated message is valid; now it would be a replay
    before = server.state_hash()
    checkpoint = (tmp_path / "server_checkpoint.pt").read_bytes()
    rng = np.random.default_rng(0)
    expected_counts: dict[str, int] = {}
    for i in range(10_000):
        if i % 50 == 49:
            reason, payload = "replay", encode(base)
        else:
            reason, payload = _mutations(base, key, rng, server.max_message_bytes)
        before_count = server.validator.refusals[reason]
        assert server.receive(receive_bytes(payload, server.max_message_bytes), "fuzz") is None, reason
        assert server.validator.refusals[reason] == before_count + 1, (i, reason, dict(server.validator.refusals))
        expected_counts[reason] = expected_counts.get(reason, 0) + 1
    assert len(expected_counts) == 15 and sum(expected_counts.values()) == 10_000
    state_after = server.state_dict()
    # refusal counters are bookkeeping; everything else of the training state is untouched
    server.validator.refusals.clear()
    assert server.state_hash() == before
    assert (tmp_path / "server_checkpoint.pt").read_bytes() == checkpoint
    assert dict(state_after["validator"]["refusals"]) == expected_counts
    # ... and training goes on
    step = server.step
    train_rounds(server, transport, tmp_path, steps=step + 1, checkpoint_every=1)
    assert server.step == step + 1 and server.state_hash() != before


def test_zero_text_tensor_must_be_zero(tiny_pipeline_dir, public_models):
    server, transport = build_simulation(split_config(tiny_pipeline_dir, "protocol.send_zero_text=true"), public_models)
    client = transport.clients["client-1"]
    message = client.forward(server.round, 4)
    assert not message.tensors["text_embedding"].any()
    message.tensors["text_embedding"][0, 0, 0] = 0.5
    message.seq += 1
    assert server.receive(receive_bytes(encode(message.signed(client.key)), server.max_message_bytes)) is None
    assert server.validator.refusals["text"] == 1


def test_transport_identity_binds_to_one_client(tiny_pipeline_dir, public_models):
    server, transport = build_simulation(split_config(tiny_pipeline_dir), public_models)

    def from_node(node: str, cid: str):
        received = receive_bytes(encode(_valid(server, transport, cid)), server.max_message_bytes)
        received.sender = node
        return server.receive(received)

    assert from_node("node:1", "client-0") is not None  # first authenticated message binds node 1
    assert from_node("node:2", "client-0") is None      # client-0 through another node
    assert from_node("node:1", "client-1") is None      # node 1 speaking for another client
    assert server.validator.refusals["identity"] == 2
    assert from_node("node:2", "client-1") is not None and from_node("node:1", "client-0") is not None
