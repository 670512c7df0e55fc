"""privdiff messages in Flower records: the header as one JSON string in a ConfigRecord, tensors as
Arrays in an ArrayRecord (never pickled; Flower stores .npy bytes and loads them with
allow_pickle=False). On the server, declared dtypes and shapes are read from the Array fields and
checked before `.numpy()` runs, and the decoded array must match what was declared.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.app import Message as FlowerMessage

from privdiff.split.messages import Message, Received, TensorSpec
from privdiff.split.validation import Refused

HEADER_RECORD = "privdiff"
TENSOR_RECORD = "tensors"
_ALLOWED_DTYPES = ("float16", "float32", "float64", "int64", "int32", "uint8")
# privdiff types -> Flower message types ("query.forward" / "train.gradient", split-controlnet.md §8.2)
FLOWER_TYPES = {"forward.request": "query.forward", "gradient.push": "train.gradient"}


def to_records(message: Message) -> RecordDict:
    header = json.dumps(message.header(), sort_keys=True, separators=(",", ":"))
    content = RecordDict({HEADER_RECORD: ConfigRecord({"header": header, "auth-tag": message.auth_tag})})
    if message.tensors:
        content[TENSOR_RECORD] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in message.tensors.items()})
    return content


def from_records(content: RecordDict, sender: str | None = None) -> Received | Refused:
    """The `Received` view of a Flower message's content, or why it cannot be one."""
    try:
        record = content.config_records[HEADER_RECORD]
        header_text, tag = record["header"], record.get("auth-tag", "")
    except (KeyError, TypeError):
        return Refused("malformed", "no privdiff header record")
    if not isinstance(header_text, str) or len(header_text) > 64 * 1024:
        return Refused("malformed", "header is not a JSON string of bounded size")
    try:
        header = json.loads(header_text)
    except json.JSONDecodeError:
        return Refused("malformed", "header is not JSON")
    if not isinstance(header, dict):
        return Refused("malformed", "header is not an object")
    arrays = content.array_records.get(TENSOR_RECORD) if TENSOR_RECORD in content.array_records else None
    if set(content.array_records) - {TENSOR_RECORD} or set(content.config_records) - {HEADER_RECORD} \
            or len(content.metric_records):
        return Refused("malformed", "unexpected records")
    specs: dict[str, TensorSpec] = {}
    num_bytes = len(header_text)
    for name, array in (arrays.items() if arrays is not None else []):
        if not isinstance(array, Array) or array.stype != "numpy.ndarray" or array.dtype not in _ALLOWED_DTYPES:
            return Refused("dtype", f"{name}: {getattr(array, 'dtype', '?')} is not an allowed numpy dtype")
        if not all(isinstance(s, int) and s >= 0 for s in array.shape):
            return Refused("shape", f"{name}: malformed shape")
        specs[name] = TensorSpec(array.dtype, tuple(array.shape))
        num_bytes += len(array.data)

    def load(name: str) -> np.ndarray:
        try:
            decoded = arrays[name].numpy()
        except Exception as err:  # np.load(allow_pickle=False) refuses object arrays, bad headers, ...
            raise Refused("malformed", f"{name}: undecodable array ({type(err).__name__})") from None
        if decoded.dtype.name != specs[name].dtype or tuple(decoded.shape) != specs[name].shape:
            raise Refused("malformed", f"{name}: data does not match its declared dtype/shape")
        return decoded

    return Received(header=header, specs=specs, num_bytes=num_bytes, load=load,
                    auth_tag=tag if isinstance(tag, str) else "", sender=sender)


def to_message(received: Received) -> Message:
    """A `Received` turned back into a `Message` (loads every tensor: only for trusted or small messages)."""
    header = received.header
    return Message(str(header.get("type")), str(header.get("client_id")), int(header.get("round", -1)),
                   int(header.get("seq", -1)), tensors={name: received.load(name) for name in received.specs},
                   public_seeds=dict(header.get("public_seeds") or {}), meta=dict(header.get("meta") or {}),
                   protocol_version=int(header.get("protocol_version", -1)), auth_tag=received.auth_tag)


def reply_to(request: FlowerMessage, message: Message) -> FlowerMessage:
    return FlowerMessage(to_records(message), reply_to=request)


__all__ = ["FLOWER_TYPES", "from_records", "reply_to", "to_message", "to_records"]
