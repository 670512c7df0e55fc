"""Fine-tuning throughput, peak memory and the demo's wall time on this machine.

Prints a table and writes JSON (default: benchmarks/results/bench_finetune.json).

    python benchmarks/bench_finetune.py            # full: 50 timed steps + one `privdiff demo`
    python benchmarks/bench_finetune.py --quick    # smoke run: few steps, demo with 5 steps
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import print_table, write_json

from privdiff.config import load_config
from privdiff.demo import DEMO_CONFIG
from privdiff.models.load import load_pipeline
from privdiff.seeding import generator
from privdiff.training.loop import make_batch
from privdiff.training.methods import get_method
from privdiff.training.run import prepare_inputs
from privdiff.runs.record import run_record
from privdiff.diffusion.task import build_task


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def time_steps(method_name: str, steps: int, warmup: int, batch_size: int) -> dict:
    cfg = load_config(DEMO_CONFIG, [f"train.method={method_name}", f"train.batch_size={batch_size}"])
    inputs = prepare_inputs(cfg)
    pipe = load_pipeline(cfg.model.pretrained)
    task = build_task(pipe, inputs.members)
    method = get_method(method_name)(cfg)
    method.prepare(task)
    timings = []
    for step in range(warmup + steps):
        rng = generator(0, "bench", step)
        batch = make_batch(task, method.batch_indices(step, task.num_examples, rng), 0.0, rng)
        began = time.perf_counter()
        method.step(task, batch, rng)
        if step >= warmup:
            timings.append(time.perf_counter() - began)
    median = sorted(timings)[len(timings) // 2]
    return {"method": method_name, "batch_size": batch_size, "timed_steps": steps,
            "median_step_s": median, "steps_per_s": 1.0 / median,
            "examples_per_s": batch_size / median}


def time_demo(steps: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "privdiff.cli", "demo", "--out", tmp, "--quiet"]
        if steps:
            cmd += ["--steps", str(steps)]
        began = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - began
    return {"demo_steps": steps or load_config(DEMO_CONFIG).train.steps, "demo_wall_time_s": wall,
            "demo_peak_rss_mib": peak_rss_mib(resource.RUSAGE_CHILDREN)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (tiny sizes)")
    parser.add_argument("--no-demo", action="store_true",
                        help="skip timing `privdiff demo` (about 13 minutes on 2 cores); the step timing only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_finetune.json")
    args = parser.parse_args()
    steps, warmup = (3, 1) if args.quick else (50, 5)
    step_result = time_steps("lora", steps, warmup, batch_size=16)
    step_result["peak_rss_mib"] = peak_rss_mib()
    demo = None if args.quick or args.no_demo else time_demo(None)  # the demo itself is exercised by the CLI test
    result = {"benchmark": "finetune", "quick": args.quick, "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "machine": platform.machine(), **run_record(),
              "finetune": step_result, "demo": demo}
    rows = [("measure", "value"),
            ("fine-tuning steps/s (LoRA, batch 16)", f"{step_result['steps_per_s']:.2f}"),
            ("examples/s", f"{step_result['examples_per_s']:.1f}"),
            ("median step time (s)", f"{step_result['median_step_s']:.4f}"),
            ("peak RSS, in-process (MiB)", f"{step_result['peak_rss_mib']:.0f}")]
    if demo:
        rows += [("demo wall time (s)", f"{demo['demo_wall_time_s']:.1f}"),
                 ("demo peak RSS (MiB)", f"{demo['demo_peak_rss_mib']:.0f}")]
    print_table(rows)
    write_json(args.out, result)

if __name__ == "__main__":
    main()
