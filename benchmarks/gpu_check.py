"""GPU check at SD-1.5 size (random weights, `privdiff.models.architectures`): LoRA against DP-LoRA step
time side by side, peak CUDA memory of a step at physical batch 1, 8 and 16 in bf16 and fp32, and the
audit query (the loss attack's per-example loss). A few minutes on one data-centre GPU (budget: 10).

Precision is plain torch: the frozen UNet is `.to(device, dtype)` and takes its inputs in that dtype,
the LoRA weights stay float32 (`add_lora`); DP-LoRA uses K = 1 and the project's engine (Opacus hooks).

Prints tables and writes JSON (default: benchmarks/results/gpu_check.json). Without CUDA it measures
nothing: one line on stderr, exit status 2.

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --smoke    # the same code on the CPU with the tiny base (checks the script only)
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from bench_scale import (
    DEFAULT_IMAGE_SIZE,
    NUM_EXAMPLES,
    PRECISIONS,
    build_unet_and_scheduler,
    cast_inputs,
    machine,
    prepared_method,
    random_task,
    run_step,
)
from common import print_table, write_json

from privdiff.audit.model import Denoiser
from privdiff.runs.record import run_record
from privdiff.seeding import generator

AUDIT_TIMESTEP = 100


class Setting:
    """What one run of the check measures: the architecture, the device and the sizes."""

    def __init__(self, smoke: bool) -> None:
        self.size, self.device = ("tiny", "cpu") if smoke else ("sd15", "cuda")
        self.image_size = DEFAULT_IMAGE_SIZE[self.size]
        self.memory_batches = (1, 2) if smoke else (1, 8, 16)
        self.timing_batch = 2 if smoke else 8
        self.timed_steps, self.warmup = (1, 1) if smoke else (10, 2)
        self.audit_batches = (1, 2) if smoke else (1, 16)
        self.audit_repeats = 1 if smoke else 10


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def unet_copy(base: torch.nn.Module, device: str, precision: str) -> torch.nn.Module:
    """A frozen copy of the float32 base on `device` in `precision` (one random draw for every setting)."""
    dtype = PRECISIONS[precision]
    unet = copy.deepcopy(base).to(device, dtype)
    cast_inputs(unet, dtype)
    return unet


def prepared(base, scheduler, s: Setting, method_name: str, precision: str, batch: int):
    unet = unet_copy(base, s.device, precision)
    task = random_task(unet, scheduler, s.size, s.image_size, num_examples=max(NUM_EXAMPLES, 2 * batch))
    return prepared_method(method_name, batch, task), task


def close(method, task) -> None:
    method.finish(task)  # DP-LoRA: detaches the Opacus hooks


def time_side_by_side(base, scheduler, s: Setting, precision: str) -> dict:
    """Median step time of LoRA and DP-LoRA at the timing batch, interleaved step by step so that any
    drift of the machine hits both alike."""
    runs = {name: prepared(base, scheduler, s, name, precision, s.timing_batch) for name in ("lora", "dp-lora")}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(s.warmup + s.timed_steps):
        for name, (method, task) in runs.items():
            synchronize(s.device)
            began = time.perf_counter()
            run_step(method, task, step, s.timing_batch)
            synchronize(s.device)
            if step >= s.warmup:
                times[name].append(time.perf_counter() - began)
    for method, task in runs.values():
        close(method, task)
    del runs
    release(s.device)
    median = {name: float(np.median(t)) for name, t in times.items()}
    return {"precision": precision, "batch": s.timing_batch, "timed_steps": s.timed_steps, "step_s": times,
            "median_step_s": median, "dp_over_lora": median["dp-lora"] / median["lora"]}


def step_memory(base, scheduler, s: Setting, method_name: str, precision: str, batch: int) -> dict:
    """Peak CUDA allocation over two steps (the first creates the optimizer state), and its part above
    the loaded model and data."""
    if s.device != "cuda":
        return {"peak_mib": None, "above_model_mib": None}
    method = task = None
    try:
        method, task = prepared(base, scheduler, s, method_name, precision, batch)
        synchronize(s.device)
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated()
        for step in range(2):
            run_step(method, task, step, batch)
        synchronize(s.device)
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mib": peak / 2**20, "above_model_mib": (peak - loaded) / 2**20}
    except torch.cuda.OutOfMemoryError:
        return {"peak_mib": None, "above_model_mib": None, "error": "out of memory"}
    finally:
        if method is not None:
            close(method, task)
        del method, task
        release(s.device)


def audit_query(base, scheduler, s: Setting, precision: str, batch: int) -> dict:
    """Median seconds of `Denoiser.loss` on `batch` examples (one UNet forward each)."""
    unet = unet_copy(base, s.device, precision)
    task = random_task(unet, scheduler, s.size, s.image_size, num_examples=max(NUM_EXAMPLES, batch))
    model = Denoiser(unet, scheduler, batch_size=batch)
    x0, contexts = task.latents[:batch], task.contexts[:batch]
    times = []
    for index in range(s.warmup + s.audit_repeats):
        noise = torch.randn(x0.shape, generator=generator(0, "gpu-check", "audit", index)).to(x0.device)
        synchronize(s.device)
        began = time.perf_counter()
        model.loss(x0, noise, AUDIT_TIMESTEP, contexts)
        synchronize(s.device)
        if index >= s.warmup:
            times.append(time.perf_counter() - began)
    del model, task, unet
    release(s.device)
    median = float(np.median(times))
    return {"precision": precision, "batch": batch, "median_s": median, "s_per_example": median / batch}


def gib(mib: float | None) -> str:
    return "-" if mib is None else f"{mib / 1024:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="run on the CPU with the tiny base (checks the script)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_check.json")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing measured", file=sys.stderr)
        sys.exit(2)
    diffusers.utils.logging.set_verbosity_error()  # `.to(dtype)` on a diffusers model warns about from_pretrained
    s = Setting(args.smoke)
    began = time.perf_counter()
    base, scheduler = build_unet_and_scheduler(s.size, "cpu", torch.float32, s.image_size)
    result = {"benchmark": "gpu_check", "smoke": args.smoke, "size": s.size, "image_size": s.image_size,
              "machine": machine(), **run_record(),
              "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}}
    result["timing"] = [time_side_by_side(base, scheduler, s, p) for p in ("bf16", "fp32")]
    result["memory"] = [{"method": m, "precision": p, "batch": b, **step_memory(base, scheduler, s, m, p, b)}
                        for p in ("bf16", "fp32") for m in ("lora", "dp-lora") for b in s.memory_batches]
    result["audit"] = [audit_query(base, scheduler, s, p, b) for p in ("bf16", "fp32") for b in s.audit_batches]
    result["total_s"] = time.perf_counter() - began

    print(f"\n{s.size} at {s.image_size} px on {result['machine'].get('cuda_device', s.device)}: step time, "
          f"DP-LoRA K=1 against LoRA, interleaved (median of {s.timed_steps} after {s.warmup} warm-up)")
    print_table([("precision", "batch", "lora s/step", "dp-lora s/step", "dp / lora")] + [
        (t["precision"], str(t["batch"]), f"{t['median_step_s']['lora']:.3f}", f"{t['median_step_s']['dp-lora']:.3f}",
         f"{t['dp_over_lora']:.2f}") for t in result["timing"]])
    print("\npeak CUDA memory of a training step, GiB (above the loaded model and data)")
    rows = [("method", "precision") + tuple(f"batch {b}" for b in s.memory_batches)]
    for p in ("bf16", "fp32"):
        for m in ("lora", "dp-lora"):
            cells = [r for r in result["memory"] if r["method"] == m and r["precision"] == p]
            rows.append((m, p) + tuple(r.get("error") or f"{gib(r['peak_mib'])} ({gib(r['above_model_mib'])})"
                                       for r in cells))
    print_table(rows)
    print("\naudit query (Denoiser.loss: one UNet forward per example)")
    print_table([("precision", "batch", "s/query", "s/example")] + [
        (a["precision"], str(a["batch"]), f"{a['median_s']:.4f}", f"{a['s_per_example']:.4f}") for a in result["audit"]])
    print(f"\ntotal {result['total_s'] / 60:.1f} min")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
