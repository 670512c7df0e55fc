"""The Flower ClientApp: privdiff's client role behind "query.forward" and "train.gradient".

Flower starts a fresh process per message, so the client is rebuilt each time from run config
(the protocol), node config (which shard, which key file) and `context.state` (its stream position
and, for vanilla, its trainable part and optimiser): that state never leaves the node.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

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
    from privdiff.split.client import ProtocolError
    from privdiff.split.flower.records import from_records, reply_to
    from privdiff.split.validation import Refused

    client = _build_client(context)
    _restore(client, context)
    received = from_records(message.content)
    if isinstance(received, Refused):
        raise ProtocolError(f"refused a server message: {received}")
    reply = client.handle(received)
    _store(client, context)
    return reply_to(message, reply)


def _build_client(context: Context):
    from privdiff.split.flower.settings import read_client_identity, split_config_from_run_config
    from privdiff.split.models import load_public_models
    from privdiff.split.run import load_triples, make_client, shard

    config = split_config_from_run_config(context.run_config)
    node = context.node_config
    identity = read_client_identity(str(node["key-file"]))
    if node.get("data-dir"):
        config.data.name = str(node["data-dir"])
        data = load_triples(config)
    else:  # a built-in dataset, sharded by partition id (simulating each client's own data)
        data = shard(load_triples(config), int(node["num-partitions"]), config.data.shard)[int(node["partition-id"])]
    models = load_public_models(config.model.pretrained)
    return make_client(config, models, identity.client_id, identity.key, data, identity.secret_seed)


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
