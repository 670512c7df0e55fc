"""A resident client worker: the client role in a long-lived process on the client's machine.

Flower runs a fresh ClientApp process for every message; importing torch and diffusers and loading
the models costs about 13 s there (measured, 2 cores). `privdiff split client` therefore starts this
worker next to the SuperNode: it loads the models and the client's data once, and the ClientApp
becomes a shim that hands each server message to it over a Unix socket (owner-only permissions)
in privdiff's wire format and returns the reply. Data, secret seed and stream position stay in
this process; nothing but the reply goes back to Flower.

The socket framing is in `worker_link` (stdlib only: the ClientApp shim imports it without torch);
this module is the worker process itself, so it imports torch and diffusers up front, before it
says "ready".
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch

from privdiff.config import _build
from privdiff.split.config import SplitConfig
from privdiff.split.flower.settings import read_client_identity
from privdiff.split.flower.worker_link import read_frame, send_frame
from privdiff.split.messages import encode, parse
from privdiff.split.models import load_public_models
from privdiff.split.setup import load_triples, make_client, shard


def serve_worker(socket_path: Path, node_config: dict) -> None:
    """Answers server messages forever (until killed) with the client role of this node."""
    clients: dict[str, object] = {}
    socket_path = Path(socket_path)
    socket_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is created owner-only
    try:
        listener.bind(str(socket_path))
    finally:
        os.umask(old_umask)
    listener.listen(4)
    print(f"privdiff split worker ready on {socket_path}", flush=True)
    while True:
        connection, _ = listener.accept()
        with connection:
            try:
                config_json = read_frame(connection).decode()
                request = read_frame(connection)
                client = clients.get(config_json)
                if client is None:
                    client = clients[config_json] = build_node_client(json.loads(config_json), node_config)
                reply = client.handle(parse(request, 1 << 28))
                send_frame(connection, b"OK" + encode(reply))
            except Exception as err:  # one bad message must not take the worker down
                try:
                    send_frame(connection, b"ER" + f"{type(err).__name__}: {err}".encode()[:2000])
                except OSError:
                    pass


def build_node_client(split_config: dict, node_config: dict):
    """The client role of a node: its key file, its data (own folder or a built-in shard), the models."""
    config = _build(SplitConfig, split_config, "").validate()
    identity = read_client_identity(str(node_config["key-file"]))
    if node_config.get("data-dir"):
        config.data.name = str(node_config["data-dir"])
        data = load_triples(config)
    else:  # a built-in dataset, sharded by partition id (simulating each client's own data)
        data = shard(load_triples(config), int(node_config["num-partitions"]), config.data.shard)[
            int(node_config["partition-id"])]
    models = load_public_models(config.model.pretrained)
    return make_client(config, models, identity.client_id, identity.key, data, identity.secret_seed)


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    threads = os.environ.get("PRIVDIFF_WORKER_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    if len(args) != 2:
        raise SystemExit("usage: python -m privdiff.split.flower.worker SOCKET NODE_CONFIG_JSON")
    serve_worker(Path(args[0]), json.loads(args[1]))


if __name__ == "__main__":
    main()
