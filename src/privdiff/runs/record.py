"""What every run records next to its outputs: versions, git commit, timings."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

import privdiff

TRACKED_PACKAGES = ("torch", "diffusers", "peft", "opacus", "transformers", "safetensors", "numpy")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the privdiff checkout in use ('+dirty' if it has local changes), else None."""
    here = Path(privdiff.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def run_record() -> dict:
    # CPU fine-tunes are bit-reproducible only at the same thread count (summation order).
    return {"privdiff_version": privdiff.__version__, "git_commit": git_commit(),
            "packages": package_versions(), "torch_threads": torch.get_num_threads()}
