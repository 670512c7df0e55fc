"""DP-LoRA cost and utility: DP step time / non-private step time on the same model and batch,
time against the noise multiplicity K, peak memory ratio, and utility at ε ∈ {1, 4, 8} against
plain LoRA on the demo's data.

Prints tables and writes JSON (default: benchmarks/results/bench_dp.json).

    python benchmarks/bench_dp.py                 # full: 30 timed steps per setting + 4 trained, evaluated runs
    python benchmarks/bench_dp.py --quick         # smoke run: few steps, tiny runs
    python benchmarks/bench_dp.py --timing-only   # step time of plain LoRA and of every DP engine at
                                                  # K = 1, 2, 4 (both adapters) and step memory per engine
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import print_table, write_json

from privdiff.config import load_config
from privdiff.demo import DEMO_CONFIG, DP_OVERRIDES
from privdiff.evaluation import EvalConfig, evaluate_run, record_key
from privdiff.models.load import load_pipeline
from privdiff.seeding import generator
from privdiff.training.loop import make_batch
from privdiff.training.methods import get_method
from privdiff.training.run import prepare_inputs, run_training
from privdiff.runs.record import run_record
from privdiff.diffusion.task import build_task

UTILITY_KEYS = ("kid/members", "fid/members", "accuracy/digit", "heldout_loss/member_test")


def prepared(method_name: str, k: int, batch: int, extra: list[str]):
    cfg = load_config(DEMO_CONFIG, [f"train.method={method_name}", f"dp.noise_multiplicity={k}",
                                    f"dp.physical_batch_size={batch}", f"dp.expected_batch_size={batch}",
                                    "dp.target_epsilon=null", "dp.noise_multiplier=1.0", *extra])
    task = build_task(load_pipeline(cfg.model.pretrained), prepare_inputs(cfg).members)
    torch.manual_seed(0)
    method = get_method(method_name)(cfg)
    method.prepare(task)
    return method, task


def step_seconds(method, task, step: int, rows: torch.Tensor) -> float:
    rng = generator(0, "bench", step)
    if method.name == "dp-lora":
        method.batch_indices(step, task.num_examples, rng)  # sets the step's keys; the batch is fixed below
    batch = make_batch(task, rows, 0.0, rng)
    began = time.perf_counter()
    method.step(task, batch, rng)
    return time.perf_counter() - began


def time_side_by_side(ks: list[int], batch: int, steps: int, warmup: int, extra: list[str],
                      engines: tuple[str, ...] = ("hooks",)) -> dict:
    """Median step time of plain LoRA and of DP-LoRA with each engine at each K, interleaved step by
    step so that machine noise hits every setting alike."""
    methods = {"lora": prepared("lora", 1, batch, [f"train.batch_size={batch}", *extra])}
    for engine in engines:
        for k in ks:
            name = f"dp-lora K={k}" if engines == ("hooks",) else f"dp-lora {engine} K={k}"
            methods[name] = prepared("dp-lora", k, batch, [*engine_overrides(engine), *extra])
    rows = torch.arange(batch)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for step in range(warmup + steps):
        for name, (method, task) in methods.items():
            seconds = step_seconds(method, task, step, rows)
            if step >= warmup:
                times[name].append(seconds)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    return {"batch_size": batch, "timed_steps": steps, "median_step_s": median,
            "ratio_to_lora": {name: median[name] / median["lora"] for name in median}}


def step_memory_mib(method_name: str, k: int, batch: int, steps: int, extra: list[str]) -> float:
    """Peak working memory of a training step (MiB): resident memory sampled every millisecond
    during `steps` steps, minus the resident memory before them (model and data loaded)."""
    import gc
    import threading

    import psutil

    method, task = prepared(method_name, k, batch, [f"train.batch_size={batch}", *extra]
                            if method_name == "lora" else extra)
    gc.collect()
    process, peak, done = psutil.Process(), [0], threading.Event()
    baseline = process.memory_info().rss

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)
    sampler = threading.Thread(target=sample)
    sampler.start()
    for step in range(steps):
        step_seconds(method, task, step, torch.arange(batch))
    done.set()
    sampler.join()
    return max(peak[0] - baseline, 0) / 2**20


def peak_memory(method: str, k: int, batch: int, steps: int, extra: list[str]) -> float:
    """`step_memory_mib` in a fresh process, so that no other setting's allocations linger."""
    code = ("import sys; sys.path.insert(0, %r); import bench_dp as b; print(b.step_memory_mib(%r, %d, %d, %d, %r))"
            % (str(Path(__file__).parent), method, k, batch, steps, extra))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def utility(epsilons: list[float], steps: int | None, num_samples: int) -> dict:
    """Plain LoRA and DP-LoRA at each ε on the demo's data, each evaluated with the same seeds."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = ["dp.epochs=null", f"train.steps={steps}"] if steps else []
        settings = {"lora": base}
        for eps in epsilons:
            settings[f"dp-lora eps={eps:g}"] = [*DP_OVERRIDES, f"dp.target_epsilon={eps}", *base]
        for name, overrides in settings.items():
            cfg = load_config(DEMO_CONFIG, [f"output_dir={Path(tmp) / name.replace(' ', '_')}", *overrides,
                                            "sample.num_images=2"])
            began = time.perf_counter()
            run_dir = run_training(cfg, show_progress=False)
            train_s = time.perf_counter() - began
            records = evaluate_run(run_dir, EvalConfig(num_samples=num_samples), show_progress=False)["records"]
            summary = json.loads((run_dir / "summary.json").read_text())
            results[name] = {"train_s": train_s, "privacy": summary["privacy"],
                             "metrics": {record_key(r): {"value": r["value"], "ci": r["ci"]}
                                         for r in records if record_key(r) in UTILITY_KEYS}}
    return results


ATTENTION_R8 = ["lora.rank=8", "lora.alpha=8", "lora.target_modules=[to_q, to_k, to_v, to_out.0]"]
ENGINES = ("hooks", "functorch", "lora", "lora-ghost")


def engine_overrides(engine: str) -> list[str]:
    """lora-ghost: the lora engine with ghost norms on every linear LoRA layer (default: chosen by cost)."""
    if engine == "lora-ghost":
        return ["dp.engine=lora", "dp.ghost_norms=always"]
    return [f"dp.engine={engine}"]


def print_timing(timing: dict) -> None:
    for adapter, t in timing.items():
        print(f"\nstep time, batch {t['batch_size']}, {adapter} (median of {t['timed_steps']}, interleaved)")
        print_table([("method", "step (s)", "/ lora")] + [
            (name, f"{t['median_step_s'][name]:.3f}", f"{t['ratio_to_lora'][name]:.2f}") for name in t["median_step_s"]])


def print_memory(memory: dict, ratio: dict) -> None:
    print("\npeak working memory of a step, batch 16 (RSS above the loaded model, separate processes)")
    print_table([("method", "step memory (MiB)", "/ lora")] + [
        (name, f"{v:.0f}", f"{ratio[name]:.2f}") for name, v in memory.items()])


def timing_only(args: argparse.Namespace) -> None:
    """Plain LoRA against every DP engine at K = 1, 2, 4 on both adapters, and step memory per engine."""
    ks = [1, 2, 4]
    engines = tuple(args.engines)
    steps, warmup = (2, 1) if args.quick else (args.steps, 2)
    timing = {"demo adapter (attention + convs, r 16)": time_side_by_side(ks, 16, steps, warmup, [], engines),
              "attention-only adapter (r 8)": time_side_by_side(ks, 16, steps, warmup, ATTENTION_R8, engines)}
    settings = [("lora", "lora", 1, [])] + [(f"dp-lora {e} K={k}", "dp-lora", k, engine_overrides(e))
                                            for e in engines for k in (1, 4)]
    memory = {name: peak_memory(m, k, 16, 2 if args.quick else 3, extra) for name, m, k, extra in settings}
    ratio = {name: v / memory["lora"] if memory["lora"] > 0 else float("nan") for name, v in memory.items()}
    result = {"benchmark": "dp-timing", "quick": args.quick, "torch_threads": torch.get_num_threads(),
              **run_record(), "timing": timing, "step_memory_mib": memory, "step_memory_ratio": ratio}
    print_timing(timing)
    print_memory(memory, ratio)
    write_json(args.out.with_name(args.out.stem + "_timing.json") if args.out == DEFAULT_OUT else args.out, result)


DEFAULT_OUT = Path(__file__).parent / "results" / "bench_dp.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (tiny sizes)")
    parser.add_argument("--timing-only", action="store_true",
                        help="only step times (plain LoRA vs each DP engine, K = 1, 2, 4) and step memory")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES,
                        help="DP engines timed by --timing-only")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting for --timing-only")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSON file (--timing-only default: results/bench_dp_timing.json)")
    args = parser.parse_args()
    if args.timing_only:
        timing_only(args)
        return
    ks = [1, 2] if args.quick else [1, 2, 4, 8]
    steps, warmup = (2, 1) if args.quick else (30, 3)
    timing = {"demo adapter (attention + convs, r 16)": time_side_by_side(ks, 16, steps, warmup, []),
              "attention-only adapter (r 8)": time_side_by_side(ks[:1], 16, steps, warmup, ATTENTION_R8)}
    memory = {name: peak_memory(m, k, 16, 2 if args.quick else 5, [])
              for name, m, k in (("lora", "lora", 1), ("dp-lora K=1", "dp-lora", 1),
                                 ("dp-lora K=4", "dp-lora", 4))}
    util = utility([8.0] if args.quick else [1.0, 4.0, 8.0], 3 if args.quick else None, 20 if args.quick else 256)
    ratio = {name: v / memory["lora"] for name, v in memory.items()}
    result = {"benchmark": "dp", "quick": args.quick, "torch_threads": torch.get_num_threads(), **run_record(),
              "timing": timing, "step_memory_mib": memory, "step_memory_ratio": ratio, "utility": util}
    print_timing(timing)
    print_memory(memory, ratio)
    print("\nutility on the demo data (quick evaluation)")
    header = ("run", "epsilon", "train (s)") + UTILITY_KEYS
    rows = [header]
    for name, r in util.items():
        eps = r["privacy"].get("epsilon") if r["privacy"] else None
        rows.append((name, "-" if eps is None else f"{eps:.2f}", f"{r['train_s']:.0f}",
                     *(f"{r['metrics'][k]['value']:.4g} [{r['metrics'][k]['ci'][0]:.3g}, {r['metrics'][k]['ci'][1]:.3g}]"
                       if k in r["metrics"] else "-" for k in UTILITY_KEYS)))
    print_table(rows)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
