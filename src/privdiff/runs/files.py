"""Atomic file writes, and training checkpoints that survive a crash at any instant."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from privdiff.config import config_yaml

CHECKPOINT_NAME = "checkpoint.pt"
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_replace(path: Path, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp)` on a temporary file next to `path`, then renames it onto `path`.

    A reader sees either the old file or the complete new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should get the usual permissions
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_replace(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_config(config: Any, path: Path) -> None:
    """Writes the resolved config as YAML, atomically (a run folder's config.yaml)."""
    atomic_write_text(path, config_yaml(config))


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_replace(Path(run_dir) / CHECKPOINT_NAME, lambda tmp: torch.save(state, tmp))


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
