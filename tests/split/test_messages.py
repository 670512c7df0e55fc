import numpy as np
import pytest
from safetensors.numpy import load as safetensors_load

from privdiff.split.messages import (
    FORWARD_REPLY,
    MalformedMessage,
    Message,
    encode,
    parse,
)


def _message() -> Message:
    rng = np.random.default_rng(0)
    return Message(FORWARD_REPLY, "client-0", 3, 7,
                   tensors={"h": rng.standard_normal((2, 4, 8, 8)).astype(np.float16),
                            "t": np.array([5, 900], dtype=np.int64)},
                   meta={"design": "backward-free"}).signed(b"k" * 32)


def test_round_trip_matches_safetensors_and_reads_specs_before_data():
    message = _message()
    payload = encode(message)
    received = parse(payload, 1 << 20)
    assert received.header["seq"] == 7 and received.auth_tag == message.auth_tag
    assert {k: (s.dtype, s.shape) for k, s in received.specs.items()} == {
        "h": ("float16", (2, 4, 8, 8)), "t": ("int64", (2,))}
    body = payload[16 + int.from_bytes(payload[8:16], "little"):]
    reference = safetensors_load(body)
    for name, array in message.tensors.items():
        assert np.array_equal(received.load(name), array) and np.array_equal(reference[name], array)


def test_size_limit_is_checked_before_parsing():
    with pytest.raises(OverflowError):
        parse(b"x" * 100, 99)


@pytest.mark.parametrize("mutate", [
    lambda p: b"NOTSPLIT" + p[8:],
    lambda p: p[:20],
    lambda p: p[:8] + (10**9).to_bytes(8, "little") + p[16:],
    lambda p: p[:-5],
    lambda p: p[:16] + b"[" + p[17:],
])
def test_malformed_framing_is_refused(mutate):
    with pytest.raises(MalformedMessage):
        parse(mutate(encode(_message())), 1 << 20)


@pytest.mark.parametrize("overrides, spec_bytes", [
    (["protocol.design=vanilla"], 10_787_840),
    (["protocol.send_zero_text=true"], 5_577_728),
    ([], 5_341_184),
    (["protocol.send=x_t"], 163_840),
])
def test_allow_lists_give_the_spec_message_sizes_at_sd15_scale(overrides, spec_bytes):
    """split-controlnet.md §7 [C]: tensor bytes per example at 512 px (latent 4x64x64, conv_in 320, text 77x768),
    plus 8 B for t."""
    from types import SimpleNamespace

    from privdiff.split.config import load_split_config
    from privdiff.split.server import reply_rules

    config = load_split_config(None, overrides + ["data.image_size=512"])
    sd15 = SimpleNamespace(latent_shape=lambda size: (4, size // 8, size // 8), stem_channels=320, text_shape=(77, 768))
    assert sum(rule.bytes_per_example() for rule in reply_rules(config, sd15).values()) == spec_bytes + 8


def test_flower_records_round_trip_and_refuse_lies():
    """Flower arrays: declared dtype/shape are checked before decoding, and the decoded array must match."""
    from flwr.app import Array, ArrayRecord

    from privdiff.split.flower.records import (
        TENSOR_RECORD,
        from_records,
        to_message,
        to_records,
    )
    from privdiff.split.validation import Refused

    message = _message()
    received = from_records(to_records(message), sender="node:7")
    assert received.sender == "node:7" and to_message(received).auth_tag == message.auth_tag
    assert all(np.array_equal(received.load(k), v) for k, v in message.tensors.items())

    content = to_records(message)
    lying = Array(np.zeros((2, 4, 8, 8), np.float16))
    lying.shape = [3, 4, 8, 8]  # declares another shape than its data holds
    content[TENSOR_RECORD] = ArrayRecord({"h": lying, "t": Array(message.tensors["t"])})
    received = from_records(content)
    with pytest.raises(Refused, match="does not match"):
        received.load("h")
    content[TENSOR_RECORD] = ArrayRecord({"h": Array(np.array(["x"], dtype=object).astype(str)), "t": Array(message.tensors["t"])})
    assert isinstance(from_records(content), Refused)
