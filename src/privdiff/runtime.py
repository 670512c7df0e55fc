"""Where a command runs its models and in which precision (`runtime.device`, `runtime.precision`).

Resolved once per process: `auto` means this process's GPU when CUDA is present (under torchrun,
the rank's own `LOCAL_RANK` GPU), else the CPU; the precision is that of the frozen weights only.
LoRA parameters, optimiser state, per-example gradients, norms, clipping and DP noise stay in fp32
whatever it is (dp-lora.md §11.8), and random draws are made on the CPU and moved, so one config
draws the same noise on any device.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from privdiff.config import RuntimeConfig
from privdiff.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_NAMES = {dtype: name for name, dtype in DTYPES.items()}
DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"


@dataclass(frozen=True)
class Runtime:
    """A resolved device and frozen-weight dtype."""

    device: torch.device
    dtype: torch.dtype

    @property
    def precision(self) -> str:
        return PRECISION_NAMES[self.dtype]

    def describe(self) -> dict[str, str]:
        """What a run records (summary.json, report card)."""
        return {"device": str(self.device), "precision": self.precision,
                **({"device_name": torch.cuda.get_device_name(self.device)} if self.device.type == "cuda" else {})}


CPU_FP32 = Runtime(torch.device("cpu"), torch.float32)


def resolve_device(spec: str) -> torch.device:
    """`auto | cpu | cuda | cuda:N | mps` -> a device this machine has.

    Raises:
        ConfigError: the form is unknown, or the machine has no such device.
    """
    spec = spec.strip().lower()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError("--device mps: this machine has no Apple MPS device (use auto or cpu)")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match is None:
        raise ConfigError(f"--device {spec!r} is not one of {DEVICE_FORMS}")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: CUDA is not available on this machine (use auto or cpu)")
    index = int(match.group(1)) if match.group(1) is not None else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"--device {spec}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def resolve_precision(spec: str, device: torch.device, *, training_method: str | None = None) -> torch.dtype:
    """`auto | fp32 | bf16 | fp16` -> the frozen weights' dtype on `device`.

    auto is bf16 on a CUDA device that supports it, else fp32.

    Raises:
        ConfigError: fp16 on the CPU (slow or missing kernels), bf16 on a GPU without it, or fp16
            for training: fp16 gradients need loss scaling, and dynamic loss scaling skips steps
            on overflow, a data-dependent decision that DP accounting does not cover; bf16 has
            fp32's exponent range and needs none.
    """
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if spec not in DTYPES:
        raise ConfigError(f"--precision {spec!r} is not one of auto, fp32, bf16, fp16")
    dtype = DTYPES[spec]
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("--precision fp16 needs a GPU; on the CPU use fp32 or bf16")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bf16 "
                          "(use fp16 for sampling and audits, fp32 for training)")
    if dtype == torch.float16 and training_method is not None:
        raise ConfigError(f"--precision fp16 is not supported for training ({training_method}): fp16 "
                          "gradients need loss scaling, whose skipped steps depend on the private data "
                          "(not covered by DP accounting); use bf16")
    return dtype


def resolve_runtime(config: RuntimeConfig, *, training_method: str | None = None) -> Runtime:
    """The device and dtype of `config`, checked against this machine (see the two resolvers)."""
    device = resolve_device(config.device)
    return Runtime(device, resolve_precision(config.precision, device, training_method=training_method))


def require_cpu_fp32(runtime: Runtime, what: str) -> Runtime:
    """Refuses a GPU or a low precision for `what`, whose device path is not built yet.

    Raises:
        ConfigError: `runtime` is not the CPU in fp32.
    """
    if runtime.device.type != "cpu" or runtime.dtype != torch.float32:
        raise ConfigError(f"{what} runs on the CPU in fp32 in this release (asked: {runtime.device}, "
                          f"{runtime.precision}); use --device cpu --precision fp32")
    return runtime
