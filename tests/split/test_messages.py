import numpy as np
import pytest
from safetensors.numpy import load as safetensors_load

from privdiff.split.messages import FORWARD_REPLY, MalformedMessage, Message, encode, parse


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
