"""`FlowerTransport`: the server's side of the Message API (a `Grid` in a ServerApp).

Requests go out as "query.forward" (replies carry the same type), gradients as "train.gradient".
Replies are keyed by the sender's node id, which the SuperLink vouches for; the validator binds a
node to one client id at its first authenticated message. A node that errs or stays silent past
the timeout is a refusal for that round, not a crash.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from flwr.app import Message as FlowerMessage
from flwr.serverapp import Grid

from privdiff.split.flower.records import (
    FLOWER_TYPES,
    from_records,
    to_message,
    to_records,
)
from privdiff.split.messages import Message, Received, encode
from privdiff.split.validation import Refused


class FlowerTransport:
    def __init__(self, grid: Grid, bindings: dict[str, str], timeout: float = 120.0, poll: float = 0.1,
                 record_dir: Path | None = None, depth: int = 1) -> None:
        self.grid = grid
        self.depth = depth
        self._inflight: dict[str, tuple] = {}   # message id -> (round, node) or ("gradient", round, node)
        self._replies: dict[tuple, FlowerMessage] = {}
        self.record_dir = record_dir  # every reply received, re-encoded in privdiff's wire format (audits)
        self._recorded = 0
        self.bindings = bindings  # the validator's node -> client bindings (read for gradient pushes)
        self.timeout = timeout
        self.poll = poll
        self.bytes_up = 0
        self.bytes_down = 0

    def node_ids(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def wait_for_nodes(self, count: int, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while len(nodes := self.node_ids()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(nodes)} of {count} SuperNodes connected after {timeout:.0f} s")
            time.sleep(0.2)
        return nodes

    def _push(self, outgoing: list[tuple[int, Message]]) -> list[str]:
        messages = []
        for node, message in outgoing:
            content = to_records(message)
            self.bytes_down += _content_bytes(content)
            messages.append(FlowerMessage(content, dst_node_id=node, message_type=FLOWER_TYPES[message.type],
                                          group_id=str(message.round)))
        return list(self.grid.push_messages(messages))

    def _collect(self, wanted: set) -> None:
        """Pulls replies of every in-flight request until all `wanted` (round, node) keys arrived."""
        deadline = time.monotonic() + self.timeout
        while True:
            if self._inflight:
                for reply in self.grid.pull_messages(list(self._inflight)):
                    key = self._inflight.pop(reply.metadata.reply_to_message_id, None)
                    if key is not None:
                        self._replies[key] = reply
            if wanted <= set(self._replies) or time.monotonic() > deadline:
                return
            time.sleep(self.poll)

    def exchange(self, requests: list[Message]) -> list[tuple[str, Received | Refused]]:
        """Gets the round's replies from every connected node (nodes are addressed by id and identify
        themselves in their signed replies, so the request's client id is not used).

        With `depth` > 1 the requests of the next rounds are already queued at the nodes
        (backward-free only: a client's forward does not depend on the server), so a SuperNode
        finds its next message without waiting for its idle poll. A node that runs two ClientApp
        processes at once may answer them out of order; the reply with the lower seq then arrives
        second and is refused as a replay (dropped and counted, training goes on).
        """
        template = requests[0]
        nodes = self.node_ids()
        queued = {key for key in self._inflight.values()} | set(self._replies)
        outgoing, keys = [], []
        for round_ in range(template.round, template.round + self.depth):
            for node in nodes:
                if (round_, node) not in queued:
                    outgoing.append((node, dataclasses.replace(template, round=round_, seq=round_)))
                    keys.append((round_, node))
        for key, message_id in zip(keys, self._push(outgoing)):
            if message_id:
                self._inflight[message_id] = key
        wanted = {(template.round, node) for node in nodes}
        self._collect(wanted)
        out = []
        for key in sorted(wanted):
            reply = self._replies.pop(key, None)
            sender = f"node:{key[1]}"
            if reply is None:
                out.append((sender, Refused("timeout", f"no reply within {self.timeout:.0f} s")))
            elif reply.has_error():
                out.append((sender, Refused("client_error", str(reply.error.reason)[:200])))
            else:
                self.bytes_up += _content_bytes(reply.content)
                received = from_records(reply.content, sender=sender)
                self._record(received)
                out.append((sender, received))
        self._inflight = {mid: key for mid, key in self._inflight.items() if key[0] >= template.round}
        return out

    def _record(self, received: Received | Refused) -> None:
        if self.record_dir is None or isinstance(received, Refused):
            return
        try:
            message = to_message(received)
        except (Refused, ValueError, TypeError):
            return
        self.record_dir.mkdir(parents=True, exist_ok=True)
        (self.record_dir / f"{self._recorded:06d}.msg").write_bytes(encode(message))
        self._recorded += 1

    def push(self, messages: list[Message]) -> None:
        """Gradients to the nodes bound to their client ids (vanilla); the acks are awaited."""
        if not messages:
            return
        node_of = {client: int(sender.split(":", 1)[1]) for sender, client in self.bindings.items()}
        outgoing = [(node_of[m.client_id], m) for m in messages if m.client_id in node_of]
        keys = [("gradient", m.round, node) for node, m in outgoing]
        for key, message_id in zip(keys, self._push(outgoing)):
            self._inflight[message_id] = key
        self._collect(set(keys))
        for key in keys:
            reply = self._replies.pop(key, None)
            if reply is None or reply.has_error():
                raise RuntimeError(f"node {key[2]} did not acknowledge its gradient")
            self.bytes_up += _content_bytes(reply.content)


def _content_bytes(content) -> int:
    """Payload bytes of a RecordDict: array data plus config strings (what the message carries)."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(array.data) for array in record.values())
    for record in content.config_records.values():
        total += sum(len(str(k)) + len(str(v)) for k, v in record.items())
    return total


__all__ = ["FlowerTransport"]
