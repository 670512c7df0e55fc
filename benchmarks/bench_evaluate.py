"""Evaluation time for 1,000 generated samples (evaluation.md §10) on this machine.

Fine-tunes a short LoRA run on the demo data (its utility does not matter here), then times
`privdiff evaluate` stage by stage. Prints a table and writes JSON
(default: benchmarks/results/bench_evaluate.json).

    python benchmarks/bench_evaluate.py            # 1,000 samples, DDIM 50 steps, guidance 3
    python benchmarks/bench_evaluate.py --quick    # smoke run: 20 samples, 5 steps
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
from pathlib import Path

import torch
from common import print_table, write_json

from privdiff.config import load_config
from privdiff.demo import DEMO_CONFIG
from privdiff.evaluation import EvalConfig, evaluate_run
from privdiff.training.run import run_training
from privdiff.runs.record import run_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (tiny sizes)")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_evaluate.json")
    args = parser.parse_args()
    samples = 20 if args.quick else args.samples
    eval_cfg = EvalConfig(num_samples=samples, num_inference_steps=5 if args.quick else 50)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(DEMO_CONFIG, [f"output_dir={tmp}/run", "train.steps=20", "sample.num_images=4"])
        run_dir = run_training(cfg, show_progress=False)
        result = evaluate_run(run_dir, eval_cfg, show_progress=not args.quick)
    timings = result["timings_s"]
    total = result["wall_time_s"]
    out = {"benchmark": "evaluate", "quick": args.quick, "num_samples": samples,
           "sampler": result["records"][0]["sampler"], "torch_threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "machine": platform.machine(), **run_record(),
           "timings_s": timings, "total_s": total, "samples_per_s_generation": samples / timings["generation_s"],
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    rows = [(f"stage ({samples} samples, {eval_cfg.scheduler} {eval_cfg.num_inference_steps} steps)", "seconds",
             "share")]
    rows += [(name.removesuffix("_s"), f"{value:.1f}", f"{value / total:.0%}") for name, value in timings.items()]
    rows += [("total", f"{total:.1f}", "100%"),
             ("generation throughput (samples/s)", f"{out['samples_per_s_generation']:.2f}", ""),
             ("peak RSS (MiB)", f"{out['peak_rss_mib']:.0f}", "")]
    print_table(rows)
    write_json(args.out, out)

if __name__ == "__main__":
    main()
