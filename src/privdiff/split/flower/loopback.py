"""Whole split-learning runs on Flower: `simulate_on_flower` (SuperLink, SuperNodes and the run, all on
loopback, started and stopped here) and `serve_on_flower` (a SuperLink for remote SuperNodes)."""

from __future__ import annotations

import json
from pathlib import Path

from privdiff.runs.files import atomic_write_json
from privdiff.runs.lock import writing_run_folder
from privdiff.split.config import SplitConfig
from privdiff.split.fidelity import evaluate_condition_fidelity
from privdiff.split.flower.deploy import LoopbackDeployment
from privdiff.split.flower.settings import write_keys
from privdiff.split.models import load_public_models
from privdiff.split.run import prepare_folder
from privdiff.split.setup import load_triples, simulated_secret_seed


def run_config_for(config: SplitConfig, folder: Path, keys_file: Path, record_dir: Path | None = None,
                   node_timeout: float = 300.0, server_threads: int = 0) -> dict:
    return {"split-config": json.dumps(config.to_dict()), "out-dir": str(folder.resolve()),
            "keys-file": str(Path(keys_file).resolve()), "node-timeout": node_timeout, "wait-for-nodes": 300.0,
            "record-dir": str(record_dir.resolve()) if record_dir else "", "pipeline-depth": 2,
            "server-threads": server_threads}


def simulate_on_flower(config: SplitConfig, *, overwrite: bool = False, evaluate: bool = True,
                       show_progress: bool = True, timeout: float = 6 * 3600,
                       extra_nodes: list[dict] | None = None, record_wire: bool = False,
                       record_messages: bool = False) -> dict:
    """Every client as its own SuperNode on loopback, the server as a ServerApp; then condition fidelity.

    Args:
        extra_nodes: node configs of additional SuperNodes (e.g. an intruder with an unknown key).
        record_wire / record_messages: keep the loopback bytes (`summary["captured"]`, and the
            `WireRecorder` bytes in flower/wire-up.bin, wire-down.bin) / every reply received
            (flower/messages/).
    """
    folder = Path(config.output_dir)
    with writing_run_folder(folder):
        return _simulate_on_flower(config, folder, overwrite, evaluate, timeout, extra_nodes, record_wire,
                                   record_messages)


def _simulate_on_flower(config: SplitConfig, folder: Path, overwrite: bool, evaluate: bool, timeout: float,
                        extra_nodes: list[dict] | None, record_wire: bool, record_messages: bool) -> dict:
    prepare_folder(folder, config, resume=False, overwrite=overwrite)
    server_keys, client_keys = write_keys(folder / "keys", config.train.clients,
                                          [simulated_secret_seed(config, i) for i in range(config.train.clients)])
    record_dir = folder / "flower" / "messages" if record_messages else None
    with LoopbackDeployment(root=folder / "flower", record_wire=record_wire) as deployment:
        for i, key_file in enumerate(client_keys):
            deployment.add_supernode(f"supernode-{i}", {"partition-id": i, "num-partitions": config.train.clients,
                                                       "key-file": str(key_file.resolve())})
        for j, node_config in enumerate(extra_nodes or []):
            deployment.add_supernode(f"extra-{j}", node_config)
        # every process shares this machine's cores: one torch thread each avoids OpenMP oversubscription
        status = deployment.run(run_config_for(config, folder, server_keys, record_dir, server_threads=1), timeout)
        if deployment.recorder is not None:
            (folder / "flower" / "wire-up.bin").write_bytes(bytes(deployment.recorder.up))
            (folder / "flower" / "wire-down.bin").write_bytes(bytes(deployment.recorder.down))
            captured = dict(deployment.recorder.total)
    summary = json.loads((folder / "summary.json").read_text())
    summary["flower_run"] = {k: status.get(k) for k in ("run-id", "status", "elapsed", "network-traffic")}
    if record_wire:
        summary["captured"] = captured
    if evaluate:
        summary["condition_fidelity"] = evaluate_saved(config, folder)
    atomic_write_json(folder / "summary.json", summary)
    return summary


def evaluate_saved(config: SplitConfig, folder: Path) -> dict:
    """Condition fidelity of the ControlNet the server saved (on the trusted evaluator's side)."""
    from diffusers import ControlNetModel

    models = load_public_models(config.model.pretrained)
    controlnet = ControlNetModel.from_pretrained(str(folder / "controlnet"), local_files_only=True)
    return evaluate_condition_fidelity(controlnet, config, models, load_triples(config, test=True))


def serve_on_flower(config: SplitConfig, keys_file: Path, *, port: int, overwrite: bool, timeout: float) -> dict:
    """A SuperLink on 0.0.0.0:port for remote SuperNodes (`privdiff split client`), then the run."""
    folder = Path(config.output_dir)
    with writing_run_folder(folder):
        prepare_folder(folder, config, resume=False, overwrite=overwrite)
        with LoopbackDeployment(root=folder / "flower", port=port, host="0.0.0.0") as deployment:
            status = deployment.run(run_config_for(config, folder, keys_file), timeout)
    summary = json.loads((folder / "summary.json").read_text())
    summary["flower_run"] = {k: status.get(k) for k in ("run-id", "status", "elapsed", "network-traffic")}
    atomic_write_json(folder / "summary.json", summary)
    return summary


__all__ = ["evaluate_saved", "run_config_for", "serve_on_flower", "simulate_on_flower"]
