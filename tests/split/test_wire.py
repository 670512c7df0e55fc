"""Nothing private crosses the in-process wire: every recorded message, both directions, both designs."""

from __future__ import annotations

import numpy as np
import pytest

from privdiff.split.messages import Message, encode, parse
from privdiff.split.run import build_simulation, train_rounds
from tests.split.conftest import split_config
from tests.split.wire_checks import byte_leaks, numeric_leaks, secret_byte_strings


@pytest.mark.parametrize("design", ["backward-free", "vanilla"])
def test_recorded_messages_hold_no_prompt_image_or_condition(design, tiny_pipeline_dir, public_models, tmp_path):
    server, transport = build_simulation(split_config(tiny_pipeline_dir, f"protocol.design={design}"), public_models)
    train_rounds(server, transport, tmp_path, steps=3, checkpoint_every=100)
    kinds = {(r.direction, r.type) for r in transport.records}
    expected = {("down", "forward.request"), ("up", "forward.reply")}
    if design == "vanilla":
        expected |= {("down", "gradient.push"), ("up", "gradient.ack")}
    assert kinds == expected
    for client in transport.clients.values():
        secrets = secret_byte_strings(client.shard, public_models.tokenizer)
        for record in transport.records:
            assert byte_leaks(record.payload, secrets) == [], record.type
            received = parse(record.payload, 1 << 30)
            tensors = {name: received.load(name) for name in received.specs}
            assert numeric_leaks(tensors, client.shard) == [], record.type


def test_the_leak_checks_catch_a_leak(tiny_pipeline_dir, public_models):
    server, transport = build_simulation(split_config(tiny_pipeline_dir), public_models)
    shard = transport.clients["client-0"].shard
    example = shard.examples[3]
    secrets = secret_byte_strings(shard, public_models.tokenizer)
    leaky = Message("forward.reply", "client-0", 0, 1, tensors={
        "image": (example.image.transpose(2, 0, 1)[None] / 255.0 * 2 - 1).astype(np.float32)},
        meta={"caption": example.caption})
    payload = encode(leaky)
    assert any("image/chw/pm1/<f4" in leak for leak in byte_leaks(payload, secrets))
    assert any("prompt" in leak for leak in byte_leaks(payload, secrets))
    # a different computation path (float32 arithmetic, fp16 rounding) defeats the byte search, not this
    nudged = {"h": (example.conditioning.astype(np.float32) / 255 + 1e-4)}
    assert byte_leaks(encode(Message("forward.reply", "client-0", 0, 1, tensors=nudged)), secrets) == []
    assert numeric_leaks(nudged, shard)
