"""Costs at full size: seconds and peak memory per example of privdiff's operations on SD-1.5-size (or
SDXL-size) models with random weights (`privdiff.models.architectures`), on this machine.

Each measurement runs in its own process, so no peak mixes with another's: a LoRA training step
(physical batch 1), a DP-LoRA step (K = 1; physical batch 1 and 2), the two alternated step by step
in one process on two copies of the UNet (the DP/LoRA ratio, side by side), an audit query (the loss attack's
per-example loss, one UNet forward), the backward-free split client's forward, and exporting the LoRA
adapter (`save_lora`) and loading it with diffusers' `load_lora_weights`. Every call runs once as a
warm-up, then `--repeat` times timed; memory is the resident set (or CUDA allocation) sampled during
all of them.

Prints a table and writes JSON (default: benchmarks/results/bench_scale.json).

    python benchmarks/bench_scale.py                      # SD-1.5 at 512 px, fp32, CPU (about 10 min on 2 cores)
    python benchmarks/bench_scale.py --precision bf16     # frozen weights and UNet inputs bf16, LoRA fp32
    python benchmarks/bench_scale.py --size sdxl --device cuda
    python benchmarks/bench_scale.py --quick              # smoke run: the tiny base, one timed repeat
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import diffusers
import numpy as np
import psutil
import torch
from common import print_table, write_json

from privdiff.audit.model import Denoiser
from privdiff.config import load_config
from privdiff.data.examples import Example, ImageDataset
from privdiff.diffusion.task import DiffusionTask
from privdiff.models.architectures import (
    build_architecture_pipeline,
    build_architecture_scheduler,
    build_component,
)
from privdiff.models.lora import add_lora, lora_state_dict, read_lora, save_lora
from privdiff.models.tiny import build_tiny_pipeline
from privdiff.runs.record import run_record
from privdiff.seeding import generator
from privdiff.split.client import BackwardFreeClient
from privdiff.split.config import ProtocolConfig
from privdiff.split.models import PublicModels
from privdiff.training.loop import make_batch
from privdiff.training.methods import get_method

SIZES = ("sd15", "sdxl", "tiny")  # tiny: the shipped base's architecture, for smoke runs
DEFAULT_IMAGE_SIZE = {"sd15": 512, "sdxl": 1024, "tiny": 32}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONTEXT_LENGTH = {"sd15": 77, "sdxl": 77, "tiny": 16}  # the tokenizer's padded length
NUM_EXAMPLES = 4  # rows of the random training set (DP needs B <= N and delta < 1/N)
AUDIT_TIMESTEP = 100  # one of the loss attack's grid timesteps


# -- the measured process -------------------------------------------------------------------------------


class PeakMemory:
    """Peak resident set (and CUDA allocation) while the block runs, sampled every 2 ms in a thread."""

    def __init__(self, device: torch.device) -> None:
        self.process, self.device = psutil.Process(), device

    def __enter__(self) -> Self:
        self.baseline = self.peak = self.process.memory_info().rss
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_baseline = torch.cuda.memory_allocated(self.device)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.cuda_peak = None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device)


def cast_inputs(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Casts the module's floating-point inputs to `dtype` (no-op for float32): its frozen weights are in
    `dtype`, and privdiff's loss draws its noise (hence x_t) in float32. The LoRA layers keep float32
    weights (`add_lora`); peft computes them in float32 and casts their output back."""
    if dtype == torch.float32:
        return

    def cast(value):
        return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value

    def cast_all(module, args, kwargs):
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    module.register_forward_pre_hook(cast_all, with_kwargs=True)


def fixed_sdxl_conditions(unet: torch.nn.Module, image_size: int) -> None:
    """SDXL's UNet also takes a pooled text embedding and the size/crop ids, which privdiff's loss does not
    pass (it trains SD-1.5-layout UNets); fixed here (zeros; the full image, uncropped) so the call costs
    what the real one does."""
    config = unet.config
    pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    ids = [image_size, image_size, 0, 0, image_size, image_size]

    def add_conditions(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        n, like = sample.shape[0], {"device": sample.device, "dtype": sample.dtype}
        kwargs.setdefault("added_cond_kwargs", {"text_embeds": torch.zeros(n, pooled_dim, **like),
                                                "time_ids": torch.tensor([ids], **like).repeat(n, 1)})
        return args, kwargs

    unet.register_forward_pre_hook(add_conditions, with_kwargs=True)


def build_pipeline(size: str, device: str, dtype: torch.dtype):
    if size == "tiny":
        return build_tiny_pipeline().to(device, dtype)
    return build_architecture_pipeline(size, device=device, dtype=dtype)


def build_unet_and_scheduler(size: str, device: str, dtype: torch.dtype, image_size: int
                             ) -> tuple[torch.nn.Module, object]:
    """The frozen UNet alone (training and queries need no encoder: privdiff encodes the data once)."""
    if size == "tiny":
        pipe = build_tiny_pipeline()
        unet, scheduler = pipe.unet.to(device, dtype), pipe.scheduler
        unet.requires_grad_(False)
    else:
        unet = build_component(size, "unet", device=device, dtype=dtype)
        scheduler = build_architecture_scheduler(size)
    if size == "sdxl":
        fixed_sdxl_conditions(unet, image_size)
    cast_inputs(unet, dtype)
    return unet, scheduler


def random_task(unet: torch.nn.Module, scheduler, size: str, image_size: int, num_examples: int = NUM_EXAMPLES
                ) -> DiffusionTask:
    """`num_examples` random latents and caption states in the model's shapes (float32, on its device)."""
    side, device = image_size // (4 if size == "tiny" else 8), unet.device
    g = generator(0, "bench-scale", "data")
    latents = torch.randn(num_examples, unet.config.in_channels, side, side, generator=g)
    contexts = torch.randn(num_examples, CONTEXT_LENGTH[size], unet.config.cross_attention_dim, generator=g)
    return DiffusionTask(unet=unet, scheduler=scheduler, latents=latents.to(device), contexts=contexts.to(device),
                         null_context=contexts[:1].to(device), example_ids=[f"x{i}" for i in range(num_examples)])


def prepared_method(method_name: str, batch: int, task: DiffusionTask):
    """The project's method on `task`, adapters attached (DP-LoRA: K = 1, sigma 1, B = physical batch)."""
    overrides = [f"train.method={method_name}", f"train.batch_size={batch}"]
    if method_name == "dp-lora":
        overrides += ["dp.noise_multiplicity=1", f"dp.physical_batch_size={batch}", f"dp.expected_batch_size={batch}",
                      "dp.target_epsilon=null", "dp.noise_multiplier=1.0", "dp.epochs=null", "train.steps=1000"]
    method = get_method(method_name)(load_config(None, overrides))
    method.prepare(task)
    return method


def run_step(method, task: DiffusionTask, index: int, batch: int) -> dict:
    """Step `index` on rows 0..batch-1 (as bench_dp: the DP method still sets its per-step keys)."""
    rng = generator(0, "bench-scale", index)
    if method.name == "dp-lora":
        method.batch_indices(index, task.num_examples, rng)  # sets the step's keys; the batch is fixed below
    return method.step(task, make_batch(task, torch.arange(batch), 0.0, rng), rng)


def training_step(args, method_name: str) -> Callable[[int], dict]:
    unet, scheduler = build_unet_and_scheduler(args.size, args.device, PRECISIONS[args.precision], args.image_size)
    task = random_task(unet, scheduler, args.size, args.image_size)
    method = prepared_method(method_name, args.batch, task)
    return lambda index: {"loss": run_step(method, task, index, args.batch)["loss"]}


def audit_query(args) -> Callable[[int], dict]:
    """`Denoiser.loss` on B examples: the per-example loss the loss attack averages over its noises."""
    unet, scheduler = build_unet_and_scheduler(args.size, args.device, PRECISIONS[args.precision], args.image_size)
    task = random_task(unet, scheduler, args.size, args.image_size)
    model = Denoiser(unet, scheduler, batch_size=args.batch)
    x0, contexts = task.latents[:args.batch], task.contexts[:args.batch]

    def query(index: int) -> dict:
        noise = torch.randn(x0.shape, generator=generator(0, "bench-scale", "audit", index)).to(x0.device)
        return {"loss": float(model.loss(x0, noise, AUDIT_TIMESTEP, contexts).mean())}
    return query


def split_client_forward(args) -> Callable[[int], dict]:
    """The backward-free client answering a forward request for B examples (two VAE encodes, the frozen
    conv_in, the activation), with every public model loaded as `load_public_models` loads them."""
    pipe = build_pipeline(args.size, args.device, PRECISIONS[args.precision])
    models = PublicModels(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                          scheduler=pipe.scheduler)
    rng = np.random.default_rng(0)
    side = args.image_size
    shard = ImageDataset("bench-scale", [
        Example(f"x{i}", rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "a photo",
                rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for i in range(NUM_EXAMPLES)])
    client = BackwardFreeClient("client-0", b"\0" * 32, models, shard, ProtocolConfig(), secret_seed=0)

    def forward(index: int) -> dict:
        reply = client.forward(index, args.batch)
        return {"sent_bytes": sum(v.nbytes for v in reply.tensors.values())}
    return forward


def lora_export_and_load(args) -> Callable[[int], dict]:
    """`save_lora` of the UNet adapter, then `pipe.load_lora_weights` of the file into the bare pipeline
    (timed apart: export_s, load_s); checks the loaded tensors equal the exported ones."""
    config = load_config(None, [])
    pipe = build_pipeline(args.size, args.device, PRECISIONS[args.precision])
    folder = Path(tempfile.mkdtemp(prefix="bench-scale-"))

    def export_and_load(index: int) -> dict:
        params = add_lora(pipe.unet, config.lora)
        with torch.no_grad():
            for p in params:  # lora_B starts at zero: give the file non-trivial values
                p.normal_(0, 0.01, generator=generator(0, "bench-scale", "lora", index))
        path = folder / f"adapter_{index}.safetensors"
        began = time.perf_counter()
        save_lora(path, pipe.unet, config.lora)
        export_s = time.perf_counter() - began
        pipe.unload_lora_weights()
        began = time.perf_counter()
        pipe.load_lora_weights(str(path), adapter_name="default")
        load_s = time.perf_counter() - began
        exported = {k.removeprefix("unet."): v for k, v in read_lora(path)[0].items()}
        loaded = lora_state_dict(pipe.unet)
        if loaded.keys() != exported.keys() or any(not torch.equal(loaded[k], v.to(loaded[k].dtype))
                                                   for k, v in exported.items()):  # diffusers casts to the base's dtype
            raise RuntimeError("load_lora_weights did not load the exported tensors")
        pipe.unload_lora_weights()
        path.unlink()
        return {"export_s": export_s, "load_s": load_s, "tensors": len(exported),
                "adapter_bytes": sum(v.numel() * v.element_size() for v in exported.values())}
    return export_and_load


def dp_over_lora(args) -> Callable[[int], dict]:
    """A plain LoRA step and a DP-LoRA step (K = 1, the default engine) on two copies of one UNet,
    alternated call by call so that machine noise hits both alike; returns every pair timed so far."""
    import copy

    unet, scheduler = build_unet_and_scheduler(args.size, args.device, PRECISIONS[args.precision], args.image_size)
    tasks = {"lora": random_task(unet, scheduler, args.size, args.image_size),
             "dp-lora": random_task(copy.deepcopy(unet), scheduler, args.size, args.image_size)}
    methods = {name: prepared_method(name, args.batch, task) for name, task in tasks.items()}
    pairs: list[dict] = []

    def both(index: int) -> dict:
        timed = {}
        for name, method in methods.items():
            began = time.perf_counter()
            run_step(method, tasks[name], index, args.batch)
            timed[f"{name}_s"] = time.perf_counter() - began
        pairs.append(timed)
        return {"pairs": list(pairs)}
    return both


MEASUREMENTS: dict[str, Callable] = {
    "dp-over-lora": dp_over_lora,
    "lora": lambda args: training_step(args, "lora"),
    "dp-lora": lambda args: training_step(args, "dp-lora"),
    "audit": audit_query,
    "split": split_client_forward,
    "export": lora_export_and_load,
}


def measure(args) -> dict:
    """Runs in the child: setup, one warm-up call, `repeat` timed calls; memory over all the calls."""
    diffusers.utils.logging.set_verbosity_error()  # `.to(dtype)` on a diffusers model warns about from_pretrained
    device = torch.device(args.device)
    began = time.perf_counter()
    call = MEASUREMENTS[args.child](args)
    setup_s = time.perf_counter() - began
    seconds, outputs = [], []
    with PeakMemory(device) as memory:
        for index in range(1 + args.repeat):
            began = time.perf_counter()
            outputs.append(call(index))
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - began)
    timed = seconds[1:]
    result = {"setup_s": setup_s, "warmup_s": seconds[0], "call_s": timed, "median_call_s": float(np.median(timed)),
              "rss_before_calls_mib": memory.baseline / 2**20, "rss_peak_during_calls_mib": memory.peak / 2**20,
              "working_mib": (memory.peak - memory.baseline) / 2**20,
              "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "outputs": outputs[-1]}
    if memory.cuda_peak is not None:
        result["cuda_peak_mib"] = memory.cuda_peak / 2**20
        result["cuda_working_mib"] = (memory.cuda_peak - memory.cuda_baseline) / 2**20
    for phase in ("export_s", "load_s"):
        if phase in outputs[-1]:
            result[f"median_{phase}"] = float(np.median([o[phase] for o in outputs[1:]]))
    return result


# -- the parent: one child process per measurement ------------------------------------------------------


def plan(args) -> list[tuple[str, str, int, dict]]:
    """(row name, child kind, batch, overrides of the child's options) in the order they run."""
    rows = [("LoRA step", "lora", 1, {})]
    rows += [("DP-LoRA step (K=1)", "dp-lora", b, {}) for b in args.dp_batches]
    rows += [("LoRA then DP-LoRA step, alternated", "dp-over-lora", 1, {})]
    rows += [("audit query (loss attack)", "audit", 1, {})]
    if args.device == "cpu":  # the split client keeps its data on the CPU; it computes in float32
        rows += [("split client forward (backward-free)", "split", 1, {"precision": "fp32"})]
    rows += [("LoRA export + load_lora_weights", "export", 1, {})]
    return rows


def run_child(args, kind: str, batch: int, overrides: dict) -> dict:
    options = {"size": args.size, "device": args.device, "precision": args.precision, "repeat": args.repeat,
               "image-size": args.image_size, "batch": batch, **overrides}
    command = [sys.executable, __file__, "--child", kind] + [x for k, v in options.items() for x in (f"--{k}", str(v))]
    out = subprocess.run(command, check=False, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"{kind} (batch {batch}) failed:\n{out.stderr[-3000:]}")
    return {"precision": options["precision"], **json.loads(out.stdout.strip().splitlines()[-1])}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    info = {"cpu": cpu, "cpus_usable": len(os.sched_getaffinity(0)), "memory_gib": psutil.virtual_memory().total / 2**30,
            "load_average_1_5_15_min": os.getloadavg()}  # other jobs on the machine slow every figure down
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def gib(mib: float) -> str:
    return f"{mib / 1024:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="sd15")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    parser.add_argument("--repeat", type=int, default=2, help="timed calls after one warm-up")
    parser.add_argument("--image-size", type=int, default=None, help="pixels (default: the architecture's)")
    parser.add_argument("--dp-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="smoke run: --size tiny --repeat 1")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_scale.json")
    parser.add_argument("--only", nargs="+", choices=tuple(MEASUREMENTS), help="run only these measurements")
    parser.add_argument("--child", choices=tuple(MEASUREMENTS), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeat = "tiny", 1
    args.image_size = args.image_size or DEFAULT_IMAGE_SIZE[args.size]
    if args.child:
        print(json.dumps(measure(args)))
        return

    began = time.perf_counter()
    result = {"benchmark": "scale", "size": args.size, "image_size": args.image_size, "device": args.device,
              "precision": args.precision, "repeat": args.repeat, "machine": machine(), **run_record(),
              "measurements": []}
    for name, kind, batch, overrides in plan(args):
        if args.only and kind not in args.only:
            continue
        print(f"measuring {name}, batch {batch} ...", flush=True)
        measured = run_child(args, kind, batch, overrides)
        result["measurements"].append({"name": name, "kind": kind, "batch": batch, **measured})
    result["total_s"] = time.perf_counter() - began
    result["load_average_at_end"] = os.getloadavg()

    cuda = args.device.startswith("cuda")
    print(f"\n{args.size} at {args.image_size} px, {args.device}, {args.precision} "
          f"(median of {args.repeat} after a warm-up; each row its own process)")
    header = ("measurement", "batch", "prec", "setup s", "s/call", "s/example", "peak RSS GiB", "above model GiB")
    rows = [header + (("CUDA peak GiB",) if cuda else ())]
    for m in result["measurements"]:
        row = (m["name"], str(m["batch"]), m["precision"], f"{m['setup_s']:.1f}", f"{m['median_call_s']:.2f}",
               f"{m['median_call_s'] / m['batch']:.2f}", gib(m["rss_peak_during_calls_mib"]), gib(m["working_mib"]))
        rows.append(row + ((gib(m["cuda_peak_mib"]),) if cuda else ()))
    print_table(rows)
    by_kind = {m["kind"]: m for m in result["measurements"]}
    if "dp-over-lora" in by_kind:
        pairs = by_kind["dp-over-lora"]["outputs"]["pairs"][1:]  # the first pair is the warm-up
        lora_s, dp_s = (float(np.median([p[f"{k}_s"] for p in pairs])) for k in ("lora", "dp-lora"))
        result["dp_over_lora"] = {"lora_step_s": lora_s, "dp_step_s": dp_s, "ratio": dp_s / lora_s,
                                  "pairs": len(pairs)}
        print(f"DP-LoRA step / LoRA step, alternated in one process: {dp_s:.2f} s / {lora_s:.2f} s "
              f"= {dp_s / lora_s:.3f}")
    if "export" not in by_kind:
        write_json(args.out, result)
        return
    export = by_kind["export"]
    print(f"export {export['median_export_s']:.2f} s + load_lora_weights {export['median_load_s']:.2f} s; "
          f"adapter {export['outputs']['adapter_bytes'] / 2**20:.1f} MiB in {export['outputs']['tensors']} tensors; "
          f"total {result['total_s'] / 60:.1f} min")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
