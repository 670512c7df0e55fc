"""Scale out on this machine: the same cores as one process with 2 threads, or as 2 torchrun
processes with 1 thread each (gloo), for the two long jobs that shard across processes.

1. A LiRA shadow farm: `privdiff audit RUN --attacks lira-offline --shadows 4` (each process
   trains its share of the shadows; the main process audits).
2. DP-LoRA: `privdiff finetune --method dp-lora --steps 200` (Opacus DPDDP, each process takes
   its share of every Poisson batch).

Wall time of the whole command (process start and imports included, as a user sees it); scaling
efficiency = t(1 process x 2 threads) / t(2 processes x 1 thread) (1.0: no gain from processes).
Prints a table and writes JSON (default: benchmarks/results/bench_scale_out.json).

    python benchmarks/bench_scale_out.py            # 4 shadows, 200 DP steps (about 10 min on 2 cores)
    python benchmarks/bench_scale_out.py --quick    # 2 shadows, 10 DP steps (smoke run)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import print_table, write_json

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


def command(args: list[str], processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "privdiff", *args]
    return [TORCHRUN, "--standalone", f"--nproc_per_node={processes}", "-m", "privdiff", *args, "--distributed"]


def timed(args: list[str], processes: int, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    began = time.perf_counter()
    done = subprocess.run(command(args, processes), env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command(args, processes))}\n{done.stderr[-2000:]}")
    return time.perf_counter() - began


def finetune_args(out: Path, method: str, steps: int) -> list[str]:
    return ["finetune", "--method", method, "--num-examples", "64", "--steps", str(steps), "--out", str(out),
            "--quiet", "--expected-batch-size", "8", "--noise-multiplier", "1.0", "--noise-multiplicity", "1",
            "--set", "sample.num_images=1", "--set", "sample.num_inference_steps=1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shadows", type=int, default=4)
    parser.add_argument("--dp-steps", type=int, default=200)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "bench_scale_out.json")
    args = parser.parse_args()
    if TORCHRUN is None:
        raise SystemExit("torchrun is not installed next to this python")
    shadows, dp_steps = (2, 10) if args.quick else (args.shadows, args.dp_steps)
    layouts = [(1, 2), (2, 1)]  # (processes, threads per process): the same two cores
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-out-") as tmp:
        work = Path(tmp)
        os.environ["PRIVDIFF_CACHE"] = str(work / "cache")
        target = work / "target"
        timed(finetune_args(target, "lora", 20), 1, 2)  # the audited run (its recipe: 20 LoRA steps)
        jobs = {f"LiRA farm, {shadows} shadows": lambda out: ["audit", str(out), "--attacks", "lira-offline",
                                                             "--shadows", str(shadows), "--bootstrap", "20",
                                                             "--quiet"],
                f"DP-LoRA, {dp_steps} steps": lambda out: finetune_args(out, "dp-lora", dp_steps)}
        for job, make_args in jobs.items():
            times = {}
            for processes, threads in layouts:
                out = work / f"{len(results)}-{processes}"
                if job.startswith("LiRA"):
                    shutil.copytree(target, out)  # fresh shadows every time
                times[(processes, threads)] = timed(make_args(out), processes, threads)
            one, two = times[(1, 2)], times[(2, 1)]
            results[job] = {"1_process_2_threads_s": round(one, 2), "2_processes_1_thread_s": round(two, 2),
                            "scaling_efficiency": round(one / two, 3)}
            rows.append((job, f"{one:.1f}", f"{two:.1f}", f"{one / two:.2f}"))
    print_table([("job", "1 proc x 2 threads (s)", "2 procs x 1 thread (s)", "efficiency"), *rows])
    write_json(args.json, {"jobs": results, "cores": os.cpu_count(), "load_average_end": os.getloadavg(),
                           "note": "wall time of the whole command, process start and imports included; "
                                   "efficiency = t(1x2) / t(2x1)"})


if __name__ == "__main__":
    main()
