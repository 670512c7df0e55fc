"""`FlowerTransport`: the server's side of the Message API (a `Grid` in a ServerApp).

Requests go out as "query.forward" (replies carry the same type), gradients as "train.gradient".
Replies are keyed by the sender's node id, which the SuperLink vouches for; the validator binds a
node to one client id at its first authenticated message. A node that errs or stays silent past
the timeout is a refusal for that round, not a crash.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Message as FlowerMessage
from flwr.serverapp import Grid

from privdiff.split.flower.records import FLOWER_TYPES, from_records, to_records
from privdiff.split.messages import Message, Received, encode
from privdiff.split.validation import Refused


class FlowerTransport:
    def __init__(self, grid: Grid, bindings: dict[str, str], timeout: float = 120.0, poll: float = 0.05,
                 record_dir: Path | None = None) -> None:
        self.grid = grid
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

    def _send_and_collect(self, outgoing: list[tuple[int, Message]]) -> dict[int, FlowerMessage | None]:
        messages = []
        for node, message in outgoing:
            content = to_records(message)
            self.bytes_down += _content_bytes(content)
            messages.append(FlowerMessage(content, dst_node_id=node, message_type=FLOWER_TYPES[message.type],
                                          group_id=str(message.round)))
        ids = list(self.grid.push_messages(messages))
        pending = {mid: node for mid, (node, _) in zip(ids, outgoing) if mid}
        replies: dict[int, FlowerMessage | None] = {node: None for node, _ in outgoing}
        deadline = time.monotonic() + self.timeout
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    replies[node] = reply
            if pending:
                time.sleep(self.poll)
        return replies

    def exchange(self, requests: list[Message]) -> list[tuple[str, Received | Refused]]:
        """Sends the round's request to every connected node (the request's client id is ignored:
        nodes are addressed by id, and identify themselves in their signed replies)."""
        template = requests[0]
        outgoing = [(node, template) for node in self.node_ids()]
        out = []
        for node, reply in self._send_and_collect(outgoing).items():
            sender = f"node:{node}"
            if reply is None:
                out.append((sender, Refused("timeout", f"no reply within {self.timeout:.0f} s")))
            elif reply.has_error():
                out.append((sender, Refused("client_error", str(reply.error.reason)[:200])))
            else:
                self.bytes_up += _content_bytes(reply.content)
                received = from_records(reply.content, sender=sender)
                self._record(received)
                out.append((sender, received))
        return out

    def _record(self, received: Received | Refused) -> None:
        if self.record_dir is None or isinstance(received, Refused):
            return
        try:
            tensors = {name: received.load(name) for name in received.specs}
        except Refused:
            return
        header = received.header
        message = Message(str(header.get("type")), str(header.get("client_id")), int(header.get("round", -1)),
                          int(header.get("seq", -1)), tensors=tensors, auth_tag=received.auth_tag)
        self.record_dir.mkdir(parents=True, exist_ok=True)
        (self.record_dir / f"{self._recorded:06d}.msg").write_bytes(encode(message))
        self._recorded += 1

    def push(self, messages: list[Message]) -> None:
        """Gradients to the nodes bound to their client ids (vanilla); the acks are awaited."""
        if not messages:
            return
        node_of = {client: int(sender.split(":", 1)[1]) for sender, client in self.bindings.items()}
        outgoing = [(node_of[m.client_id], m) for m in messages if m.client_id in node_of]
        for node, reply in self._send_and_collect(outgoing).items():
            if reply is None or reply.has_error():
                raise RuntimeError(f"node {node} did not acknowledge its gradient")
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
