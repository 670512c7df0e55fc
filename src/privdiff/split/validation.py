"""Server-side checks on every message before it can touch training state (split-controlnet.md §8.3).

Order: size (before decoding), framing, protocol version and type, client identity, declared
tensor names/dtypes/shapes (before any tensor is materialised), auth tag, replay and round, then
values (finite, bounded, timesteps in the policy, text tensor absent or zero). A failed check raises
`Refused(reason)`; the caller logs it, counts it and drops the message.
"""

from __future__ import annotations

import hmac
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from privdiff.split.messages import PROTOCOL_VERSION, Received, TensorSpec, auth_tag

log = logging.getLogger("privdiff.split")

HEADER_ALLOWANCE = 16 * 1024  # framing, header JSON and safetensors table, per message
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class Refused(Exception):
    """A message the server will not use; `reason` is one of a fixed set of short codes."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TensorRule:
    """Allowed dtype and per-example shape of one named tensor; the batch dimension comes first."""

    dtype: str
    example_shape: tuple[int, ...]

    def bytes_per_example(self) -> int:
        return int(np.prod(self.example_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Limits:
    max_batch: int = 64
    max_abs_value: float = 1e4
    t_min: int = 0
    t_max: int = 999

    def max_bytes(self, rules: dict[str, TensorRule]) -> int:
        """min(64 MiB, 1.25 × the expected size at max_batch)."""
        expected = HEADER_ALLOWANCE + self.max_batch * sum(r.bytes_per_example() for r in rules.values())
        return int(min(MAX_MESSAGE_BYTES, 1.25 * expected))


@dataclass
class MessageValidator:
    """Checks replies of one type against an allow-list; keeps the per-client replay counters.

    Args:
        rules: tensor name -> rule, exactly the names allowed (and required) in this message type.
        keys: client id -> HMAC key; a client id not in here is unknown.
        zero_tensors: names whose values must be all zeros (the optional zero text tensor).
    """

    message_type: str
    rules: dict[str, TensorRule]
    keys: dict[str, bytes]
    limits: Limits = field(default_factory=Limits)
    zero_tensors: tuple[str, ...] = ()
    last_seq: dict[str, int] = field(default_factory=dict)
    bindings: dict[str, str] = field(default_factory=dict)  # transport identity -> client id
    refusals: Counter = field(default_factory=Counter)

    @property
    def max_bytes(self) -> int:
        return self.limits.max_bytes(self.rules)

    def validate(self, message: Received, round_: int) -> dict[str, np.ndarray]:
        """The message's tensors (copied, writable) if it passes every rule; commits its seq.

        Raises:
            Refused: the first rule it breaks.
        """
        if message.num_bytes > self.max_bytes:
            raise Refused("too_large", f"{message.num_bytes} bytes > {self.max_bytes}")
        client = self._check_header(message.header, message.sender, round_)
        self._check_specs(message.specs)
        key = self.keys[client]
        expected_tag = auth_tag(message.header, message.specs, message.load, key)
        if not (isinstance(message.auth_tag, str) and hmac.compare_digest(expected_tag, message.auth_tag)):
            raise Refused("auth", f"bad tag from '{client}'")
        if message.sender is not None:
            self._check_binding(message.sender, client)
        seq = message.header["seq"]
        if seq <= self.last_seq.get(client, -1):
            raise Refused("replay", f"seq {seq} <= last {self.last_seq.get(client, -1)}")
        tensors = {name: np.array(message.load(name)) for name in self.rules}
        self._check_values(tensors)
        self.last_seq[client] = seq
        if message.sender is not None:
            self.bindings[message.sender] = client
        return tensors

    def _check_binding(self, sender: str, client: str) -> None:
        """A transport identity (Flower node id) speaks for one client id, and a client id through
        one transport identity; the first authenticated, accepted message makes the binding."""
        bound = self.bindings.get(sender)
        if bound is not None and bound != client:
            raise Refused("identity", f"'{sender}' is bound to '{bound}', not '{client}'")
        if bound is None and client in self.bindings.values():
            raise Refused("identity", f"'{client}' already speaks through another node")

    def _check_header(self, header: dict, sender: str | None, round_: int) -> str:
        fields = {"type": str, "protocol_version": int, "client_id": str, "round": int, "seq": int,
                  "public_seeds": dict, "meta": dict}
        for name, kind in fields.items():
            value = header.get(name)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise Refused("malformed", f"header field '{name}' missing or not {kind.__name__}")
        if set(header) - set(fields):
            raise Refused("malformed", f"unexpected header fields {sorted(set(header) - set(fields))}")
        if header["protocol_version"] != PROTOCOL_VERSION:
            raise Refused("version", f"protocol {header['protocol_version']} != {PROTOCOL_VERSION}")
        if header["type"] != self.message_type:
            raise Refused("type", f"'{header['type']}' where '{self.message_type}' is expected")
        client = header["client_id"]
        if client not in self.keys:
            raise Refused("unknown_client", repr(client)[:80])
        if header["round"] != round_:
            raise Refused("round", f"round {header['round']} != current {round_}")
        return client

    def _check_specs(self, specs: dict[str, TensorSpec]) -> int:
        if set(specs) != set(self.rules):
            extra, missing = sorted(set(specs) - set(self.rules)), sorted(set(self.rules) - set(specs))
            raise Refused("tensor_names", f"extra {extra[:5]} missing {missing}")
        batches = set()
        for name, rule in self.rules.items():
            spec = specs[name]
            if spec.dtype != rule.dtype:
                raise Refused("dtype", f"{name}: {spec.dtype} != {rule.dtype}")
            if len(spec.shape) != 1 + len(rule.example_shape) or tuple(spec.shape[1:]) != rule.example_shape:
                raise Refused("shape", f"{name}: {spec.shape} != (B, {', '.join(map(str, rule.example_shape))})")
            batches.add(spec.shape[0])
        if len(batches) != 1:
            raise Refused("shape", f"batch sizes differ across tensors: {sorted(batches)}")
        batch = batches.pop()
        if not 1 <= batch <= self.limits.max_batch:
            raise Refused("batch_size", f"B = {batch} not in [1, {self.limits.max_batch}]")
        return batch

    def _check_values(self, tensors: dict[str, np.ndarray]) -> None:
        for name, array in tensors.items():
            if array.dtype.kind == "f":
                if not np.isfinite(array).all():
                    raise Refused("non_finite", name)
                if np.abs(array).max(initial=0) > self.limits.max_abs_value:
                    raise Refused("out_of_range", f"{name}: |value| > {self.limits.max_abs_value:g}")
            if name in self.zero_tensors and np.any(array):
                raise Refused("text", f"{name} must be all zeros")
        if "t" in tensors:
            t = tensors["t"]
            if t.min() < self.limits.t_min or t.max() > self.limits.t_max:
                raise Refused("timestep", f"t outside [{self.limits.t_min}, {self.limits.t_max}]")

    def refuse(self, error: Refused, client: object) -> None:
        """Counts and logs a refusal (the message itself is dropped by the caller).

        A flood is logged sparsely (the first 10 of each reason, then every 1000th) so that a
        hostile client cannot fill the server's disk through its log; the counters stay exact.
        """
        self.refusals[error.reason] += 1
        count = self.refusals[error.reason]
        if count <= 10 or count % 1000 == 0:
            log.warning("refused %s from %s (%s #%d): %s", self.message_type, str(client)[:80], error.reason,
                        count, error)

    def state_dict(self) -> dict:
        return {"last_seq": dict(self.last_seq), "refusals": dict(self.refusals), "bindings": dict(self.bindings)}

    def load_state_dict(self, state: dict) -> None:
        self.last_seq = {str(k): int(v) for k, v in state["last_seq"].items()}
        self.refusals = Counter({str(k): int(v) for k, v in state["refusals"].items()})
        self.bindings = {str(k): str(v) for k, v in state.get("bindings", {}).items()}


__all__ = ["Limits", "MessageValidator", "Refused", "TensorRule"]
