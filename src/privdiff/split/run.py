"""The server's round loop, shared by every transport, and `simulate` (everything in-process).

A round: the server asks every client for a batch, validates each reply, makes one optimiser step
on the valid ones (vanilla: pushes the gradients back), logs, and checkpoints every N steps. A
refused reply is dropped and counted; the round goes on with the others.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from privdiff.data.builtin import BUILTIN_DATASETS
from privdiff.data.examples import ImageDataset
from privdiff.errors import ConfigError, DataError, PrivdiffError
from privdiff.seeding import derive_seed
from privdiff.split.client import BackwardFreeClient, SplitClient, VanillaClient
from privdiff.split.config import SplitConfig
from privdiff.split.models import PublicModels
from privdiff.split.server import SplitServer
from privdiff.split.transport import InProcessTransport, Transport

MAX_EMPTY_ROUNDS = 20


def load_triples(config: SplitConfig, test: bool = False) -> ImageDataset:
    """The training triples (or the held-out test triples, another seed) of the split run."""
    d = config.data
    if d.name in BUILTIN_DATASETS:
        dataset = BUILTIN_DATASETS[d.name](d.image_size, d.test_examples if test else d.num_examples,
                                           d.test_seed if test else d.seed)
    else:
        from privdiff.data import load_image_folder

        dataset = load_image_folder(d.name, d.image_size)
    if any(ex.conditioning is None for ex in dataset.examples):
        raise DataError(f"dataset '{d.name}' has no conditioning images (split ControlNet needs triples)")
    return dataset


def shard(dataset: ImageDataset, num_clients: int, how: str) -> list[ImageDataset]:
    """Client shards: by index (iid) or by the prompt's first colour word (non-IID `colour`)."""
    if how == "iid":
        groups = [[ex.id for i, ex in enumerate(dataset.examples) if i % num_clients == c] for c in range(num_clients)]
    else:
        colours = sorted({ex.caption.split()[1] for ex in dataset.examples})
        owner = {colour: i % num_clients for i, colour in enumerate(colours)}
        groups = [[ex.id for ex in dataset.examples if owner[ex.caption.split()[1]] == c] for c in range(num_clients)]
    if any(not g for g in groups):
        raise DataError(f"sharding '{how}' leaves a client without data ({num_clients} clients)")
    return [dataset.subset(g) for g in groups]


def client_id(index: int) -> str:
    return f"client-{index}"


def make_client(config: SplitConfig, models: PublicModels, cid: str, key: bytes, data: ImageDataset,
                secret_seed: int) -> SplitClient:
    if config.protocol.design == "vanilla":
        return VanillaClient(cid, key, models, data, config.protocol, secret_seed,
                             init_seed=config.train.seed, learning_rate=config.train.client_learning_rate)
    return BackwardFreeClient(cid, key, models, data, config.protocol, secret_seed)


def train_rounds(server: SplitServer, transport: Transport, folder: Path, steps: int, checkpoint_every: int,
                 on_round: Callable[[dict], None] | None = None,
                 before_checkpoint: Callable[[], None] | None = None) -> None:
    """Runs rounds until `steps` optimiser steps are made; checkpoints atomically every N steps."""
    empty = 0
    while server.step < steps:
        started = time.perf_counter()
        replies = transport.exchange(server.requests())
        batches = [b for cid, item in replies if (b := server.receive(item, cid)) is not None]
        row = {"round": server.round, "step": server.step, "clients": [b.client_id for b in batches],
               "examples": sum(len(b.tensors["t"]) for b in batches)}
        if batches:
            result = server.train_step(batches)
            transport.push(result.pushes)
            row["loss"] = result.loss
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
        if batches and (server.step % checkpoint_every == 0 or server.step == steps):
            if before_checkpoint:
                before_checkpoint()
            server.save_checkpoint(folder)


def build_simulation(config: SplitConfig, models: PublicModels) -> tuple[SplitServer, InProcessTransport]:
    """Server, clients (keys and secret seeds made here) and the in-process transport."""
    shards = shard(load_triples(config), config.train.clients, config.data.shard)
    keys = {client_id(i): secrets.token_bytes(32) for i in range(config.train.clients)}
    server = SplitServer(config, models, keys)
    clients = {cid: make_client(config, models, cid, keys[cid], shards[i],
                                derive_seed(config.train.seed, "simulated-client-secret", i))
               for i, cid in enumerate(keys)}
    return server, InProcessTransport(clients, server.max_message_bytes)


__all__ = ["build_simulation", "client_id", "load_triples", "make_client", "shard", "train_rounds"]
