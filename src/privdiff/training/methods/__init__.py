"""Training methods, registered under their CLI word (`--method`); importing this package registers
every one of them."""

from __future__ import annotations

from privdiff.training.methods.base import METHODS, TrainBatch, TrainingMethod
from privdiff.training.methods.dp_lora import DPLoRA
from privdiff.training.methods.dreambooth import DreamBoothLoRA
from privdiff.training.methods.lora import FullUNet, LoRA
from privdiff.training.methods.smp_lora import MPLoRA, SMPLoRA

get_method = METHODS.get

__all__ = ["DPLoRA", "DreamBoothLoRA", "FullUNet", "LoRA", "METHODS", "MPLoRA", "SMPLoRA", "TrainBatch",
           "TrainingMethod", "get_method"]
