"""Typed split-learning messages and their wire format (split-controlnet.md §8.1, §8.3 rules 1–2).

A message is a header (type, protocol version, client id, round, seq, public seeds, metadata,
auth tag) plus named tensors. On privdiff's own wire it is

    b"PDSPLIT1" | uint64 LE header length | header JSON | safetensors bytes

and nothing is ever unpickled: the safetensors header is parsed by hand so that every tensor's
declared dtype and shape can be checked before a single tensor byte is copied (`parse`). The
Flower transport carries the same header in a ConfigRecord and the tensors in an ArrayRecord,
and builds the same `Received` view from them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from safetensors.numpy import save as safetensors_save

PROTOCOL_VERSION = 1
MAGIC = b"PDSPLIT1"
FORWARD_REQUEST = "forward.request"
FORWARD_REPLY = "forward.reply"
GRADIENT_PUSH = "gradient.push"
GRADIENT_ACK = "gradient.ack"
MESSAGE_TYPES = (FORWARD_REQUEST, FORWARD_REPLY, GRADIENT_PUSH, GRADIENT_ACK)

_MAX_HEADER_BYTES = 64 * 1024
# safetensors dtype codes <-> numpy names; only what the protocol can carry.
_SAFETENSORS_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
                       "I32": "int32", "U8": "uint8"}


class MalformedMessage(ValueError):
    """The bytes are not a privdiff message (bad framing, header or tensor table)."""


@dataclass
class Message:
    """One protocol message. Tensors are numpy arrays (what every transport can carry)."""

    type: str
    client_id: str
    round: int
    seq: int
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    public_seeds: dict[str, int] = field(default_factory=dict)
    meta: dict[str, str | int | float] = field(default_factory=dict)
    protocol_version: int = PROTOCOL_VERSION
    auth_tag: str = ""

    def header(self) -> dict:
        """Everything but the tensors (and the tag), as JSON-ready values."""
        return {"type": self.type, "protocol_version": self.protocol_version, "client_id": self.client_id,
                "round": self.round, "seq": self.seq, "public_seeds": dict(self.public_seeds),
                "meta": dict(self.meta)}

    def signed(self, key: bytes) -> "Message":
        self.auth_tag = auth_tag(self.header(), {k: _spec_of(v) for k, v in self.tensors.items()},
                                 self.tensors.__getitem__, key)
        return self


@dataclass(frozen=True)
class TensorSpec:
    dtype: str              # numpy name: float16, float32, int64, ...
    shape: tuple[int, ...]

    @property
    def num_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _spec_of(array: np.ndarray) -> TensorSpec:
    return TensorSpec(array.dtype.name, tuple(int(s) for s in array.shape))


@dataclass
class Received:
    """A message as the receiver sees it before trusting it: header, declared tensor specs, size.

    `load(name)` materialises one tensor; validation calls it only after the declared specs passed.
    `sender` is the identity the transport itself vouches for (Flower node id), if any.
    """

    header: dict
    specs: dict[str, TensorSpec]
    num_bytes: int
    load: Callable[[str], np.ndarray]
    auth_tag: str = ""
    sender: str | None = None


def canonical_bytes(header: dict, specs: dict[str, TensorSpec], load: Callable[[str], np.ndarray]) -> bytes:
    """The bytes the auth tag covers: sorted header JSON, then each tensor's name, spec and data."""
    parts = [json.dumps(header, sort_keys=True, separators=(",", ":")).encode()]
    for name in sorted(specs):
        spec = specs[name]
        parts.append(json.dumps([name, spec.dtype, list(spec.shape)]).encode())
        array = np.ascontiguousarray(load(name))
        parts.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return b"\0".join(parts)


def auth_tag(header: dict, specs: dict[str, TensorSpec], load: Callable[[str], np.ndarray], key: bytes) -> str:
    """HMAC-SHA256 (hex) of the canonical bytes under the client's key (split-controlnet.md §8.4)."""
    return hmac.new(key, canonical_bytes(header, specs, load), hashlib.sha256).hexdigest()


def encode(message: Message) -> bytes:
    header = dict(message.header(), auth_tag=message.auth_tag)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    tensors = {k: np.ascontiguousarray(v) for k, v in message.tensors.items()}
    body = safetensors_save(tensors) if tensors else b""
    return MAGIC + struct.pack("<Q", len(head)) + head + body


def parse(data: bytes, max_bytes: int) -> Received:
    """Reads the framing and both headers of `data`; no tensor is copied yet.

    Raises:
        MalformedMessage: bad framing, a header that is not the expected JSON, or a tensor table
            whose offsets do not match the declared dtypes and shapes.
        OverflowError: `data` is longer than `max_bytes` (checked before anything is parsed).
    """
    if len(data) > max_bytes:
        raise OverflowError(f"{len(data)} bytes > limit {max_bytes}")
    view = memoryview(data)
    if bytes(view[:8]) != MAGIC or len(data) < 16:
        raise MalformedMessage("bad magic")
    (head_len,) = struct.unpack("<Q", view[8:16])
    if head_len > min(_MAX_HEADER_BYTES, len(data) - 16):
        raise MalformedMessage("header length out of range")
    header = _json_object(bytes(view[16:16 + head_len]), "header")
    tag = header.pop("auth_tag", "")
    body = view[16 + head_len:]
    specs, offsets = _tensor_table(body)

    def load(name: str) -> np.ndarray:
        start, end = offsets[name]
        spec = specs[name]
        return np.frombuffer(body[start:end], dtype=np.dtype(spec.dtype).newbyteorder("<")).reshape(spec.shape)

    return Received(header=header, specs=specs, num_bytes=len(data), load=load,
                    auth_tag=tag if isinstance(tag, str) else "")


def _json_object(raw: bytes, what: str) -> dict:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MalformedMessage(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise MalformedMessage(f"{what} is not an object")
    return value


def _tensor_table(body: memoryview) -> tuple[dict[str, TensorSpec], dict[str, tuple[int, int]]]:
    """The safetensors header of `body`: specs and absolute byte ranges, checked for consistency."""
    if len(body) == 0:
        return {}, {}
    if len(body) < 8:
        raise MalformedMessage("truncated tensor table")
    (table_len,) = struct.unpack("<Q", body[:8])
    if table_len > min(_MAX_HEADER_BYTES, len(body) - 8):
        raise MalformedMessage("tensor table length out of range")
    table = _json_object(bytes(body[8:8 + table_len]), "tensor table")
    table.pop("__metadata__", None)
    data_start = 8 + table_len
    specs, offsets, spans = {}, {}, []
    for name, entry in table.items():
        if not (isinstance(entry, dict) and entry.get("dtype") in _SAFETENSORS_DTYPES
                and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
                and len(entry["data_offsets"]) == 2
                and all(isinstance(v, int) and v >= 0 for v in entry["shape"] + entry["data_offsets"])):
            raise MalformedMessage(f"tensor '{name}' has a malformed entry")
        spec = TensorSpec(_SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]))
        begin, end = entry["data_offsets"]
        if end - begin != spec.num_bytes or data_start + end > len(body):
            raise MalformedMessage(f"tensor '{name}' does not match its byte range")
        specs[name], offsets[name] = spec, (data_start + begin, data_start + end)
        spans.append((begin, end))
    spans.sort()
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        raise MalformedMessage("tensor byte ranges overlap")
    return specs, offsets


__all__ = ["FORWARD_REPLY", "FORWARD_REQUEST", "GRADIENT_ACK", "GRADIENT_PUSH", "MESSAGE_TYPES", "MalformedMessage",
           "Message", "PROTOCOL_VERSION", "Received", "TensorSpec", "auth_tag", "canonical_bytes", "encode", "parse"]
