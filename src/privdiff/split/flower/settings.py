"""What the Flower apps read from run config and node config (kebab-case keys, Flower's convention)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from privdiff.config import _build
from privdiff.errors import ConfigError
from privdiff.runs.files import atomic_write_json
from privdiff.split.config import SplitConfig
from privdiff.split.setup import client_id


def split_config_from_run_config(run_config: dict) -> SplitConfig:
    text = run_config.get("split-config", "")
    if not text:
        raise ConfigError("run config 'split-config' is empty: start the run with `privdiff split server`")
    return _build(SplitConfig, json.loads(text), "").validate()


def read_server_keys(path: str | Path) -> dict[str, bytes]:
    """{client id: key} from the server's keys file."""
    try:
        raw = json.loads(Path(path).read_text())
        return {str(cid): bytes.fromhex(key) for cid, key in raw.items()}
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"cannot read the server keys file {path}: {err}") from None


@dataclass(frozen=True)
class ClientIdentity:
    client_id: str
    key: bytes
    secret_seed: int


def read_client_identity(path: str | Path) -> ClientIdentity:
    """A client's key file: its id, its HMAC key and its secret seed (never sent)."""
    try:
        raw = json.loads(Path(path).read_text())
        return ClientIdentity(str(raw["client_id"]), bytes.fromhex(raw["key"]), int(raw["secret_seed"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"cannot read the client key file {path}: {err}") from None


def write_keys(folder: Path, num_clients: int, secret_seeds: list[int] | None = None) -> tuple[Path, list[Path]]:
    """A keys file for the server and one key file per client (fresh random keys; random secret seeds
    unless given, as simulations do to repeat)."""
    import os
    import secrets

    folder.mkdir(parents=True, exist_ok=True)
    seeds = secret_seeds or [secrets.randbits(62) for _ in range(num_clients)]
    identities = [ClientIdentity(client_id(i), secrets.token_bytes(32), seeds[i]) for i in range(num_clients)]
    server_file = folder / "server-keys.json"
    atomic_write_json(server_file, {c.client_id: c.key.hex() for c in identities})
    client_files = []
    for c in identities:
        path = folder / f"{c.client_id}.json"
        atomic_write_json(path, {"client_id": c.client_id, "key": c.key.hex(), "secret_seed": c.secret_seed})
        os.chmod(path, 0o600)
        client_files.append(path)
    os.chmod(server_file, 0o600)
    return server_file, client_files


__all__ = ["ClientIdentity", "read_client_identity", "read_server_keys", "split_config_from_run_config", "write_keys"]
