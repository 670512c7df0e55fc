"""Registry of training methods: the key is the CLI word (`--method`)."""

from __future__ import annotations

from privdiff.errors import ConfigError
from privdiff.training.methods.base import TrainBatch, TrainingMethod
from privdiff.training.methods.dp_lora import DPLoRA
from privdiff.training.methods.lora import FullUNet, LoRA
from privdiff.training.methods.smp_lora import MPLoRA, SMPLoRA

METHODS: dict[str, type[TrainingMethod]] = {}


def register_method(cls: type[TrainingMethod]) -> type[TrainingMethod]:
    METHODS[cls.name] = cls
    return cls


for _cls in (LoRA, DPLoRA, SMPLoRA, MPLoRA, FullUNet):
    register_method(_cls)


def get_method(name: str) -> type[TrainingMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}' (choose from: {', '.join(sorted(METHODS))})") from None


__all__ = ["METHODS", "TrainBatch", "TrainingMethod", "get_method", "register_method"]
