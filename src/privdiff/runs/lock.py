"""One writer per run folder: an advisory lock held for as long as a run writes its folder.

Two `privdiff` processes pointed at the same `--out` (a second terminal, a retried job, an
`--overwrite` while the first still trains) would interleave checkpoints, logs and adapters. The
first takes `flock` on `.privdiff.lock` in the folder; the second is refused in one line. The
kernel drops the lock when its holder dies, so a killed run can be resumed at once.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from privdiff.errors import ConfigError

LOCK_NAME = ".privdiff.lock"
_held: dict[Path, IO[str]] = {}


def lock_run_folder(folder: Path) -> None:
    """Creates `folder` if needed and takes its writer lock for this process (re-entrant).

    Raises:
        ConfigError: another process holds it.
    """
    folder = Path(folder).resolve()
    if folder in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_NAME, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"{folder} is being written by another privdiff process ({holder}): wait for it "
                          f"to finish or choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    _held[folder] = handle


def release_run_folder(folder: Path) -> None:
    """Releases this process's lock on `folder` (nothing if it holds none)."""
    handle = _held.pop(Path(folder).resolve(), None)
    if handle is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


@contextmanager
def writing_run_folder(folder: Path) -> Iterator[None]:
    """Releases the folder's lock (taken inside the block, by `prepare_run_dir`) when the block ends."""
    try:
        yield
    finally:
        release_run_folder(folder)


__all__ = ["LOCK_NAME", "lock_run_folder", "release_run_folder", "writing_run_folder"]
