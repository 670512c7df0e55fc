"""The Flower ServerApp: privdiff's server role behind a `Grid` (Message API)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from privdiff.runs.files import atomic_write_json
from privdiff.split.flower.settings import (
    read_server_keys,
    split_config_from_run_config,
)
from privdiff.split.flower.transport import FlowerTransport
from privdiff.split.models import load_public_models
from privdiff.split.run import serve
from privdiff.split.server import SplitServer

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    if int(run_config.get("server-threads", 0)) > 0:  # e.g. 1 when clients share the machine (loopback)
        import torch

        torch.set_num_threads(int(run_config["server-threads"]))
    config = split_config_from_run_config(run_config)
    folder = Path(str(run_config["out-dir"]))
    server = SplitServer(config, load_public_models(config.model.pretrained), read_server_keys(run_config["keys-file"]))
    record_dir = Path(str(run_config["record-dir"])) if run_config.get("record-dir") else None
    transport = FlowerTransport(grid, bindings=server.validator.bindings, timeout=float(run_config["node-timeout"]),
                                record_dir=record_dir,
                                depth=int(run_config["pipeline-depth"]) if config.protocol.design == "backward-free" else 1)
    transport.wait_for_nodes(config.train.clients, float(run_config["wait-for-nodes"]))
    summary = serve(config, server, transport, folder, show_progress=False)
    examples = max(1, summary["examples_received"])
    summary["transport"] = "flower"
    summary["wire"] = {"examples": examples, "up_bytes": transport.bytes_up, "down_bytes": transport.bytes_down,
                       "up_bytes_per_example": round(transport.bytes_up / examples, 1),
                       "down_bytes_per_example": round(transport.bytes_down / examples, 1),
                       "nodes": transport.node_ids(), "bindings": dict(server.validator.bindings)}
    atomic_write_json(folder / "summary.json", summary)
