"""Shared option handling: CLI flags become dotted config overrides, so the config stays the truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from privdiff.config import RunConfig, RuntimeConfig, load_config


def build_config(config_file: Path | None, flags: dict[str, Any], extra: list[str] | None,
                 base: Any = None, kind: type = RunConfig) -> Any:
    """Config file (or `base`) <- explicit flags (`section.key` -> value, None = not given) <- --set."""
    overrides = [f"{key}={_yaml_value(value)}" for key, value in flags.items() if value is not None]
    return load_config(config_file, overrides + list(extra or []), base=base, kind=kind)


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def device_option() -> Any:
    return typer.Option(None, "--device", help="auto (this machine's GPU when CUDA is present, else the CPU) | cpu "
                                               "| cuda | cuda:N | mps.")


def precision_option() -> Any:
    return typer.Option(None, "--precision", help="Frozen weights: auto (bf16 on CUDA that has it, else fp32) | "
                                                  "fp32 | bf16 | fp16 (not for training).")


def runtime_flags(device: str | None, precision: str | None) -> dict[str, str | None]:
    """--device / --precision as config overrides."""
    return {"runtime.device": device, "runtime.precision": precision}


def runtime_config(device: str | None, precision: str | None) -> Any:
    """--device / --precision for a command without a config file of its own."""
    return RuntimeConfig(device=device or "auto", precision=precision or "auto")
