"""The Flower ClientApp: privdiff's client role behind "query.forward" and "train.gradient".

Flower starts a fresh process per message. With a resident worker (node config `worker-socket`,
started by `privdiff split client`) this module only forwards the message to it; without one the
client is rebuilt each time from run config (the protocol), node config (which shard, which key
file) and `context.state` (its stream position and, for vanilla, its trainable part and
optimiser), which costs the torch/diffusers import (about 13 s) per message. Either way the state
never leaves the node.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from privdiff.split.flower.records import from_records, reply_to, to_message
from privdiff.split.flower.worker_link import call_worker
from privdiff.split.messages import encode, parse
from privdiff.split.validation import Refused

app = ClientApp()
STATE_RECORD = "privdiff-client"
WEIGHTS_RECORD = "privdiff-client-weights"


@app.query("forward")
def forward(message: Message, context: Context) -> Message:
    return _handle(message, context)


@app.train("gradient")
def gradient(message: Message, context: Context) -> Message:
    return _handle(message, context)


def _handle(message: Message, context: Context) -> Message:
    received = from_records(message.content)
    if isinstance(received, Refused):
        raise ValueError(f"refused a server message: {received}")
    worker = context.node_config.get("worker-socket")
    if worker:  # the resident worker holds the client (no torch in this process)
        answer = call_worker(str(worker), str(context.run_config["split-config"]), encode(to_message(received)))
        return reply_to(message, to_message(parse(answer, 1 << 28)))
    client = _build_client(context)
    _restore(client, context)
    reply = client.handle(received)
    _store(client, context)
    return reply_to(message, reply)


def _build_client(context: Context):
    # Local: torch + diffusers (13 s); only a node without a resident worker pays for them.
    from privdiff.split.flower.worker import build_node_client

    return build_node_client(json.loads(str(context.run_config["split-config"])), dict(context.node_config))


def _restore(client, context: Context) -> None:
    import torch

    if STATE_RECORD not in context.state.config_records:
        return
    saved = json.loads(str(context.state.config_records[STATE_RECORD]["state"]))
    if WEIGHTS_RECORD in context.state.array_records:
        arrays = {k: torch.from_numpy(v.numpy().copy()) for k, v in context.state.array_records[WEIGHTS_RECORD].items()}
        saved["trainable"] = {k[len("trainable/"):]: v for k, v in arrays.items() if k.startswith("trainable/")}
        optimizer = client.optimizer.state_dict()
        state: dict = {}
        for key, value in arrays.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/")
                state.setdefault(int(index), {})[name] = value
        saved["optimizer"] = {"state": state, "param_groups": optimizer["param_groups"]}
    client.load_state_dict(saved)


def _store(client, context: Context) -> None:
    state = client.state_dict()
    small = {k: v for k, v in state.items() if k not in ("trainable", "optimizer")}
    context.state.config_records[STATE_RECORD] = ConfigRecord({"state": json.dumps(small)})
    if "trainable" in state:
        arrays = {f"trainable/{k}": Array(np.ascontiguousarray(v.detach().cpu().numpy()))
                  for k, v in state["trainable"].items()}
        for index, entries in state["optimizer"]["state"].items():
            for name, value in entries.items():
                arrays[f"optimizer/{index}/{name}"] = Array(np.asarray(value.detach().cpu().numpy()))
        context.state.array_records[WEIGHTS_RECORD] = ArrayRecord(arrays)
