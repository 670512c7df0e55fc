"""The server's round loop, shared by every transport, and `simulate` (everything in-process).

A round: the server asks every client for a batch, validates each reply, makes one optimiser step
on the valid ones (vanilla: pushes the gradients back), logs, and checkpoints every N steps. A
refused reply is dropped and counted; the round goes on with the others.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from privdiff.errors import PrivdiffError
from privdiff.runs.files import (
    atomic_replace,
    atomic_write_json,
    atomic_write_text,
    save_config,
)
from privdiff.runs.folder import SPLIT_CHECKPOINT_FILE, SPLIT_RUN_FILES, prepare_run_dir
from privdiff.runs.lock import writing_run_folder
from privdiff.runs.record import run_record
from privdiff.split.accounting import reference_formula_epsilon
from privdiff.split.config import SplitConfig
from privdiff.split.fidelity import evaluate_condition_fidelity
from privdiff.split.models import PublicModels, load_public_models
from privdiff.split.server import SplitServer
from privdiff.split.setup import (
    client_id,
    load_triples,
    make_client,
    shard,
    simulated_secret_seed,
)
from privdiff.split.transport import InProcessTransport, Transport

MAX_EMPTY_ROUNDS = 20


def train_rounds(server: SplitServer, transport: Transport, folder: Path, steps: int, checkpoint_every: int,
                 on_round: Callable[[dict], None] | None = None,
                 before_checkpoint: Callable[[], None] | None = None) -> None:
    """Runs rounds until `steps` optimiser steps are made; checkpoints atomically every N steps."""
    empty = 0
    while server.step < steps:
        started = time.perf_counter()
        replies = transport.exchange(server.requests())
        batches = [b for cid, item in replies if (b := server.receive(item, cid)) is not None]
        batches.sort(key=lambda b: b.client_id)  # the same step whatever order the transport delivered
        row = {"round": server.round, "step": server.step, "clients": [b.client_id for b in batches],
               "examples": sum(len(b.tensors["t"]) for b in batches)}
        if batches:
            losses = []
            for step_batches in server.step_batches(batches):
                if server.step >= steps:
                    break
                result = server.train_step(step_batches)
                transport.push(result.pushes)
                losses.append(result.loss)
            row["loss"] = sum(losses) / len(losses)
            row["steps"] = len(losses)
            empty = 0
        else:
            empty += 1
            if empty >= MAX_EMPTY_ROUNDS:
                raise PrivdiffError(f"no valid reply in {MAX_EMPTY_ROUNDS} rounds (refusals: "
                                    f"{dict(server.validator.refusals)})")
        row["seconds"] = round(time.perf_counter() - started, 4)
        server.end_round(row)
        if on_round:
            on_round(row)
        if batches and (server.step // checkpoint_every > (server.step - row["steps"]) // checkpoint_every
                        or server.step >= steps):
            if before_checkpoint:
                before_checkpoint()
            server.save_checkpoint(folder)


def build_simulation(config: SplitConfig, models: PublicModels,
                     keys: dict[str, bytes] | None = None) -> tuple[SplitServer, InProcessTransport]:
    """Server, clients (fresh keys unless given; secret seeds derived from the seed: a simulation
    is reproducible) and the in-process transport."""
    shards = shard(load_triples(config), config.train.clients, config.data.shard)
    keys = keys or {client_id(i): secrets.token_bytes(32) for i in range(config.train.clients)}
    server = SplitServer(config, models, keys)
    clients = {cid: make_client(config, models, cid, keys[cid], shards[i], simulated_secret_seed(config, i))
               for i, cid in enumerate(keys)}
    return server, InProcessTransport(clients, server.max_message_bytes)


def prepare_folder(folder: Path, config: SplitConfig, resume: bool, overwrite: bool) -> None:
    """Creates the run folder (or checks it for --resume) and writes the resolved config and run record."""
    if prepare_run_dir(folder, config, resume, overwrite, SPLIT_RUN_FILES, SPLIT_CHECKPOINT_FILE) or \
            (resume and (folder / "config.yaml").is_file()):
        return
    save_config(config, folder / "config.yaml")
    atomic_write_json(folder / "run.json", {**run_record(), "kind": "split", "seed": config.train.seed})


def serve(config: SplitConfig, server: SplitServer, transport: Transport, folder: Path,
          show_progress: bool = True, on_checkpoint: Callable[[], None] | None = None) -> dict:
    """Resumes from the folder's checkpoint if any, trains, saves the ControlNet; returns the summary."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    resumed = server.load_checkpoint(folder)
    began = time.perf_counter()
    progress = Progress(TextColumn("[bold]split training"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), disable=not show_progress)
    with progress:
        bar = progress.add_task("split", total=config.train.steps, completed=server.step, loss=float("nan"))

        def on_round(row: dict) -> None:
            progress.update(bar, completed=server.step, loss=row.get("loss", float("nan")))

        def write_log() -> None:
            atomic_write_text(folder / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in server.log))
            if on_checkpoint:
                on_checkpoint()

        train_rounds(server, transport, folder, config.train.steps, config.train.checkpoint_every, on_round,
                     before_checkpoint=write_log)
    write_log()
    server.save_controlnet(folder / "controlnet")
    seconds = time.perf_counter() - began
    examples = sum(r["examples"] for r in server.log)
    losses = [r["loss"] for r in server.log if "loss" in r]
    window = max(1, min(LOSS_WINDOW, len(losses) // 2))  # first and last windows never overlap
    summary = {
        "design": config.protocol.design, "protocol": dataclasses.asdict(config.protocol),
        "steps": server.step, "rounds": server.round, "resumed": resumed, "train_seconds": round(seconds, 2),
        "examples_received": examples, "refusals": dict(server.validator.refusals),
        "loss_first": _mean(losses[:window]), "loss_last": _mean(losses[-window:]), "loss_window": window,
        "controlnet": str(folder / "controlnet"),
    }
    atomic_write_json(folder / "summary.json", summary)
    return summary


LOSS_WINDOW = 20  # rounds averaged for the first and the last loss of the summary


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def simulate(config: SplitConfig, *, resume: bool = False, overwrite: bool = False, evaluate: bool = True,
             show_progress: bool = True) -> dict:
    """`privdiff split simulate`: server and clients in one process, then condition fidelity.

    Writes the run folder (config, record, log, checkpoint, controlnet/, summary.json with the wire
    bytes per sample in both directions and, if `evaluate`, the trained/untrained/ceiling fidelity).
    """
    folder = Path(config.output_dir)
    with writing_run_folder(folder):  # taken by prepare_folder, held until the summary is written
        return _simulate(config, folder, resume, overwrite, evaluate, show_progress)


def _simulate(config: SplitConfig, folder: Path, resume: bool, overwrite: bool, evaluate: bool,
              show_progress: bool) -> dict:
    prepare_folder(folder, config, resume, overwrite)
    models = load_public_models(config.model.pretrained)
    server, transport = build_simulation(config, models)
    if resume:
        _restore_clients(folder, transport)
    summary = serve(config, server, transport, folder, show_progress,
                    on_checkpoint=lambda: _save_clients(folder, transport))
    summary["transport"] = "in-process"
    summary["wire"] = wire_bytes(transport, server.log)
    privacy = local_privacy(config, transport.clients.values())
    if privacy:
        summary["local_privacy"] = privacy
    if evaluate:
        summary["condition_fidelity"] = evaluate_condition_fidelity(server.controlnet, config, models,
                                                                    load_triples(config, test=True))
    atomic_write_json(folder / "summary.json", summary)
    return summary


def local_privacy(config: SplitConfig, clients) -> dict | None:
    """Hardened option: each client's worst per-sample μ and ε (split-controlnet.md §10), next to the prediction from
    t_start; None for the published protocol (no guarantee to report)."""
    ledgers = {c.client_id: c.ledger.summary(config.protocol.t_start) for c in clients if c.ledger is not None}
    if not ledgers:
        return None
    worst = max(ledgers.values(), key=lambda s: s.get("worst_mu", 0.0))
    return {"unit": "sample (replace-one, local DP)", "clients": ledgers,
            "worst_epsilon": worst.get("worst_epsilon"), "worst_mu": worst.get("worst_mu"),
            "delta": config.protocol.delta,
            "reference_formula_not_a_guarantee": reference_formula_epsilon(config.protocol.t_start)}


def wire_bytes(transport: InProcessTransport, log: list[dict]) -> dict:
    """Measured serialised bytes per training example, each direction (messages, headers included)."""
    examples = max(1, sum(r["examples"] for r in log))
    up = transport.bytes_by("up")
    down = transport.bytes_by("down")
    return {"examples": examples, "up_bytes": up, "down_bytes": down,
            "up_bytes_per_example": round(up / examples, 1), "down_bytes_per_example": round(down / examples, 1),
            "gradient_bytes_per_example": round(transport.bytes_by("down", "gradient.push") / examples, 1)}


def _save_clients(folder: Path, transport: InProcessTransport) -> None:
    """Simulation only: the clients' stream positions, so that --resume continues their streams."""
    import torch

    state = {cid: client.state_dict() for cid, client in transport.clients.items()}
    atomic_replace(folder / "simulated_clients.pt", lambda tmp: torch.save(state, tmp))


def _restore_clients(folder: Path, transport: InProcessTransport) -> None:
    import torch

    path = folder / "simulated_clients.pt"
    if path.exists():
        for cid, state in torch.load(path, map_location="cpu", weights_only=True).items():
            transport.clients[cid].load_state_dict(state)


__all__ = ["build_simulation", "local_privacy", "prepare_folder", "serve", "simulate", "train_rounds", "wire_bytes"]
