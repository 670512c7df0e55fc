"""Split-learning ControlNet costs (split-controlnet.md §7, §11): bytes per example upstream and
downstream for both designs (measured on the serialised messages, and at SD-1.5 scale from the
tensor allow-lists, next to the spec's computed numbers), client time, peak memory and FLOPs per
example for both designs, and training throughput in-process versus over Flower on loopback.

Prints tables and writes JSON (default: benchmarks/results/bench_split.json).

    python benchmarks/bench_split.py            # full
    python benchmarks/bench_split.py --quick    # smoke run: tiny sizes, a short Flower run
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import torch
from common import print_table, write_json

from privdiff.split.config import load_split_config
from privdiff.split.messages import encode, parse
from privdiff.split.models import load_public_models
from privdiff.split.run import build_simulation, train_rounds
from privdiff.split.server import reply_rules
from privdiff.runs.record import run_record

VARIANTS = {  # name -> config overrides
    "vanilla": ["protocol.design=vanilla"],
    "backward-free (reference: s0 + zero text)": ["protocol.send_zero_text=true"],
    "backward-free (default: s0)": [],
    "backward-free (x_t instead of s0)": ["protocol.send=x_t"],
}
# split-controlnet.md §7 [C]: exact tensor bytes per example at SD-1.5 scale (plus 8 B for t)
SPEC_SD15_BYTES = {"vanilla": 10_787_840, "backward-free (reference: s0 + zero text)": 5_577_728,
                   "backward-free (default: s0)": 5_341_184, "backward-free (x_t instead of s0)": 163_840}


def sd15_bytes(overrides: list[str]) -> int:
    """Tensor bytes per example of a reply at SD-1.5 scale (512 px, f8, conv_in 320, text 77x768)."""
    config = load_split_config(None, overrides + ["data.image_size=512"])
    models = SimpleNamespace(latent_shape=lambda size: (4, size // 8, size // 8), stem_channels=320,
                             text_shape=(77, 768))
    return sum(rule.bytes_per_example() for rule in reply_rules(config, models).values())


def measured_bytes(overrides: list[str], rounds: int, base: list[str]) -> dict:
    config = load_split_config(None, base + overrides)
    server, transport = build_simulation(config, MODELS)
    train_rounds(server, transport, Path(tempfile.mkdtemp()), steps=rounds, checkpoint_every=10**9)
    examples = sum(r["examples"] for r in server.log)
    return {"up_per_example": transport.bytes_by("up") / examples, "down_per_example": transport.bytes_by("down") / examples,
            "gradient_down_per_example": transport.bytes_by("down", "gradient.push") / examples,
            "request_bytes": transport.bytes_by("down", "forward.request") / server.round / config.train.clients}


class PeakRSS:
    """Peak resident memory above the baseline, sampled every millisecond in a thread."""

    def __enter__(self):
        self.process = psutil.Process()
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.delta_mib = (self.peak - self.baseline) / 2**20


def client_costs(overrides: list[str], batch: int, repeats: int, base: list[str]) -> dict:
    """Time, peak RSS and FLOPs per example of one client answering a request (vanilla: and applying
    the pushed gradient). Memory: the resident-set growth during the client's first round (torch's
    CPU tensors bypass tracemalloc, so RSS is the honest measure), sampled every millisecond."""
    from torch.utils.flop_counter import FlopCounterMode

    config = load_split_config(None, base + overrides + [f"train.request_size={batch}"])
    server, transport = build_simulation(config, MODELS)
    client = transport.clients["client-0"]
    vanilla = config.protocol.design == "vanilla"

    def one_round():
        reply = client.forward(server.round, batch)
        if vanilla:
            gradient = np.random.default_rng(0).standard_normal(reply.tensors["control"].shape).astype(np.float32)
            push = parse(encode(type(reply)("gradient.push", client.client_id, server.round, server.round,
                                            tensors={"gradient": gradient * 1e-3})), 1 << 30)
            client.apply_gradient(push)

    one_round()  # warm-up
    with FlopCounterMode(display=False) as counter:
        one_round()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        one_round()
        times.append(time.perf_counter() - began)
    return {"ms_per_example": 1e3 * float(np.median(times)) / batch,
            "mflops_per_example": counter.get_total_flops() / batch / 1e6,
            "trainable_parameters": sum(p.numel() for p in getattr(client, "trainable", torch.nn.Module()).parameters())}


def client_memory(overrides: list[str], batch: int, base: list[str]) -> float:
    """Peak RSS growth (MiB) of a fresh process during its client's first round, after the models and
    the data are loaded (torch's CPU tensors bypass tracemalloc, so RSS is the honest measure)."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys, numpy as np, torch\n"
        "sys.path.insert(0, %r)\n"
        "import bench_split as b\n"
        "from privdiff.split.config import load_split_config\n"
        "from privdiff.split.models import load_public_models\n"
        "from privdiff.split.run import build_simulation\n"
        "from privdiff.split.messages import encode, parse\n"
        "torch.set_num_threads(2)\n"
        "config = load_split_config(None, %r)\n"
        "server, transport = build_simulation(config, load_public_models(None))\n"
        "client = transport.clients['client-0']\n"
        "with b.PeakRSS() as m:\n"
        "    reply = client.forward(0, %d)\n"
        "    if config.protocol.design == 'vanilla':\n"
        "        g = np.zeros(reply.tensors['control'].shape, np.float32)\n"
        "        client.apply_gradient(parse(encode(type(reply)('gradient.push', 'client-0', 0, 0, tensors={'gradient': g})), 1 << 30))\n"
        "print(json.dumps(m.delta_mib))\n"
    ) % (str(Path(__file__).parent), base + overrides + [f"train.request_size={batch}"], batch)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-1000:])
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def throughput(steps: int, request_size: int, flower: bool, base: list[str]) -> dict:
    overrides = base + [f"train.request_size={request_size}", f"train.steps={steps}", "train.checkpoint_every=1000000"]
    folder = Path(tempfile.mkdtemp(prefix="bench-split-"))
    config = load_split_config(None, overrides + [f"output_dir={folder / 'run'}"])
    began = time.perf_counter()
    if flower:
        from privdiff.split.flower.loopback import simulate_on_flower

        summary = simulate_on_flower(config, evaluate=False, show_progress=False)
    else:
        from privdiff.split.run import simulate

        summary = simulate(config, evaluate=False, show_progress=False)
    wall = time.perf_counter() - began
    rounds = summary["rounds"]
    return {"rounds": rounds, "examples": summary["examples_received"], "train_s": summary["train_seconds"],
            "wall_s": wall, "examples_per_s": summary["examples_received"] / summary["train_seconds"],
            "s_per_round": summary["train_seconds"] / rounds, "up_bytes_per_example": summary["wire"]["up_bytes_per_example"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_split.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    base = ["data.num_examples=64"] if args.quick else ["data.num_examples=512"]
    global MODELS
    MODELS = load_public_models(None)
    result: dict = {"run": run_record(), "quick": args.quick, "bytes": {}, "client": {}, "throughput": {}}

    rows = [("design", "up B/example", "down B/example", "of which gradient", "SD-1.5 tensor B/ex", "split-controlnet.md §7")]
    for name, overrides in VARIANTS.items():
        measured = measured_bytes(overrides, 2 if args.quick else 5, base)
        measured["sd15_tensor_bytes_per_example"] = sd15_bytes(overrides)
        result["bytes"][name] = measured
        rows.append((name, f"{measured['up_per_example']:.0f}", f"{measured['down_per_example']:.0f}",
                     f"{measured['gradient_down_per_example']:.0f}", f"{measured['sd15_tensor_bytes_per_example']:,}",
                     f"{SPEC_SD15_BYTES[name]:,}"))
    print("\nBytes per example (tiny base measured on the serialised messages; SD-1.5 from tensor shapes)")
    print_table(rows)

    rows = [("design", "ms/example", "peak RSS delta MiB", "MFLOPs/example", "trainable params")]
    for name in ("vanilla", "backward-free (default: s0)"):
        costs = client_costs(VARIANTS[name], 8, 3 if args.quick else 20, base)
        costs["peak_rss_delta_mib"] = client_memory(VARIANTS[name], 8, base)
        result["client"][name] = costs
        rows.append((name, f"{costs['ms_per_example']:.2f}", f"{costs['peak_rss_delta_mib']:.1f}",
                     f"{costs['mflops_per_example']:.1f}", f"{costs['trainable_parameters']:,}"))
    print("\nClient cost per example (batch 8, median)")
    print_table(rows)

    steps = 4 if args.quick else 40
    rows = [("transport", "rounds", "examples/s", "s/round", "up B/example")]
    for name, flower in (("in-process", False), ("flower loopback", True)):
        measured = throughput(steps, 64, flower, base)
        result["throughput"][name] = measured
        rows.append((name, str(measured["rounds"]), f"{measured['examples_per_s']:.1f}", f"{measured['s_per_round']:.2f}",
                     f"{measured['up_bytes_per_example']:.0f}"))
    result["throughput"]["flower_over_inprocess"] = (result["throughput"]["flower loopback"]["examples_per_s"]
                                                     / result["throughput"]["in-process"]["examples_per_s"])
    print(f"\nTraining throughput, backward-free, 2 clients x 64 examples per round, {steps} steps")
    print_table(rows)
    print(f"flower / in-process throughput: {result['throughput']['flower_over_inprocess']:.2f}")
    write_json(args.out, result)


MODELS = None

if __name__ == "__main__":
    main()
