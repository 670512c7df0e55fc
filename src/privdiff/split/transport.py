"""Transports move messages between the roles; the roles never know which one they run on.

`InProcessTransport` (tests, one machine) serialises every message to privdiff's wire format, keeps
a record of the exact bytes in both directions (for the wire checks and byte counts) and parses
replies with the server's size limit before anything else, as a network transport would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from privdiff.split.client import SplitClient
from privdiff.split.messages import MalformedMessage, Message, Received, encode, parse
from privdiff.split.validation import Refused

_REQUEST_LIMIT = 1 << 20  # server -> client control messages are small; gradients use the reply limit


@dataclass
class WireRecord:
    direction: str   # "down" (server -> client) | "up" (client -> server)
    client_id: str
    type: str
    payload: bytes


class Transport(Protocol):
    def exchange(self, requests: list[Message]) -> list[tuple[str, Received | Refused]]:
        """Sends each request to its client; returns (client id, reply or transport-level refusal)."""

    def push(self, messages: list[Message]) -> None:
        """Delivers server -> client messages that need no data back (vanilla gradients)."""


def receive_bytes(payload: bytes, max_bytes: int) -> Received | Refused:
    """Parses bytes from the network into a `Received`, or the refusal that explains why not."""
    try:
        return parse(payload, max_bytes)
    except OverflowError as err:
        return Refused("too_large", str(err))
    except MalformedMessage as err:
        return Refused("malformed", str(err))


@dataclass
class InProcessTransport:
    clients: dict[str, SplitClient]
    max_reply_bytes: int
    max_push_bytes: int = 64 * 1024 * 1024
    record: bool = True
    records: list[WireRecord] = field(default_factory=list)

    def _send(self, message: Message, limit: int) -> Message:
        payload = encode(message)
        self._keep("down", message, payload)
        received = receive_bytes(payload, limit)
        if isinstance(received, Refused):
            raise RuntimeError(f"in-process request could not be parsed: {received}")
        reply = self.clients[message.client_id].handle(received)
        return reply

    def exchange(self, requests: list[Message]) -> list[tuple[str, Received | Refused]]:
        out = []
        for request in requests:
            reply = self._send(request, _REQUEST_LIMIT)
            payload = encode(reply)
            self._keep("up", reply, payload)
            out.append((request.client_id, receive_bytes(payload, self.max_reply_bytes)))
        return out

    def push(self, messages: list[Message]) -> None:
        for message in messages:
            ack = self._send(message, self.max_push_bytes)
            self._keep("up", ack, encode(ack))

    def _keep(self, direction: str, message: Message, payload: bytes) -> None:
        if self.record:
            self.records.append(WireRecord(direction, message.client_id, message.type, payload))

    def bytes_by(self, direction: str, message_type: str | None = None) -> int:
        return sum(len(r.payload) for r in self.records
                   if r.direction == direction and (message_type is None or r.type == message_type))


__all__ = ["InProcessTransport", "Transport", "WireRecord", "receive_bytes"]
