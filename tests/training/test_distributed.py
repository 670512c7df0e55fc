"""Data parallel training under torchrun (two CPU processes, gloo) for every method: the same
update as one process on the same global batch, and an exact resume after a kill (issue 32)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from privdiff.models.lora import LORA_WEIGHT_NAME, read_lora

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int, rendezvous: str = "standalone") -> list[str]:
    """The command line of `privdiff ARGS` in one process, or under torchrun in `nproc` processes
    (`standalone`, or the multi-node form through the c10d rendezvous on loopback)."""
    if nproc == 1:
        return [sys.executable, "-m", "privdiff", *args]
    if rendezvous == "c10d":
        where = ["--nnodes", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                 "--rdzv-id", "privdiff-test"]
    else:
        where = ["--standalone"]
    return [TORCHRUN, *where, f"--nproc_per_node={nproc}", "-m", "privdiff", *args, "--distributed"]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(args: list[str], nproc: int, rendezvous: str = "standalone") -> subprocess.CompletedProcess:
    return subprocess.run(launch(args, nproc, rendezvous), capture_output=True, text=True, env=environment(),
                          timeout=300)


def finetune_args(method: str, pipeline: Path, out: Path, steps: int = 3) -> list[str]:
    dp = ["--noise-multiplier", "1.0", "--expected-batch-size", "6", "--noise-multiplicity", "2"]
    return ["finetune", "--method", method, "--pretrained", str(pipeline), "--num-examples", "32",
            "--steps", str(steps), "--batch-size", "6", "--lr", "0.02", "--rank", "2", "--out", str(out),
            "--quiet", "--set", "sample.num_images=1", "--set", "sample.num_inference_steps=1",
            "--set", "train.log_every=1", "--set", "train.checkpoint_every=1",
            "--set", "smp.proxy_batch_per_class=3", "--set", "smp.probe_every=100",
            "--set", "smp.proxy_lr=0.001", *(dp if method == "dp-lora" else [])]


def adapters_close(a: Path, b: Path) -> None:
    """The same draws and the same global-batch step, its sums taken in another order: equal to 1e-6,
    except where AdamW divides a gradient element of the size of its ε (1e-8) by its own root mean
    square: there the last-bit difference of a sum that nearly cancels moves the update by up to a
    few 1e-3 of the learning rate (seen in mp-lora: 3 of 1,400 elements, 4e-5 at lr 0.02)."""
    first, _ = read_lora(a / LORA_WEIGHT_NAME)
    second, _ = read_lora(b / LORA_WEIGHT_NAME)
    assert first.keys() == second.keys()
    diff = torch.cat([(second[k] - first[k]).abs().flatten() for k in first])
    scale = torch.cat([first[k].abs().flatten() for k in first])
    assert (diff <= 1e-6 + 1e-5 * scale).float().mean() >= 0.99
    assert diff.max() <= 1e-4


@pytest.mark.slow
@needs_torchrun
@pytest.mark.parametrize("method", ["lora", "mp-lora", "smp-lora"])
def test_two_processes_take_the_step_of_one_process_on_the_global_batch(method, tiny_pipeline_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for out, nproc in ((one, 1), (two, 2)):
        done = run(finetune_args(method, tiny_pipeline_dir, out, steps=2), nproc)
        assert done.returncode == 0, done.stderr[-3000:]
    adapters_close(one, two)
    log = "train_log.jsonl" if method == "lora" else "smp_log.jsonl"
    rows_one = [json.loads(line) for line in (one / log).read_text().splitlines()]
    rows_two = [json.loads(line) for line in (two / log).read_text().splitlines()]
    for a, b in zip(rows_one, rows_two, strict=True):
        assert a.keys() == b.keys()
        for key in ("loss", "grad_norm", "ce_m", "proxy_ce"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), key
    parallel = json.loads((two / "summary.json").read_text())["parallel"]
    assert parallel["world_size"] == 2 and parallel["effective_batch_size"] == 6
    assert parallel["per_process_batch_size"] == 3 and parallel["learning_rate"] == 0.02


@pytest.mark.slow
@needs_torchrun
def test_the_c10d_rendezvous_of_a_multi_node_launch_works_on_loopback(tiny_pipeline_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for out, nproc, rendezvous in ((one, 1, ""), (two, 2, "c10d")):
        done = run(finetune_args("lora", tiny_pipeline_dir, out, steps=2), nproc, rendezvous)
        assert done.returncode == 0, done.stderr[-3000:]
    adapters_close(one, two)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_launch(pid: int) -> None:
    """SIGKILL to torchrun and every worker at once: a preemption, no process gets to clean up."""
    for target in [pid, *descendants(pid)]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_after_checkpoint(args: list[str], out: Path, after_step: int) -> int:
    """Starts a 2-process run and kills it (SIGKILL to the whole launch) once its checkpoint has
    reached `after_step`; returns the checkpoint's step at the kill."""
    launched = subprocess.Popen(launch(args, 2), env=environment(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    checkpoint = out / "checkpoint.pt"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and launched.poll() is None:
            if checkpoint.exists():
                step = torch.load(checkpoint, weights_only=True)["step"]
                if step >= after_step:
                    kill_launch(launched.pid)
                    break
            time.sleep(0.02)
    finally:
        if launched.poll() is None:
            kill_launch(launched.pid)
        launched.wait()
    return torch.load(checkpoint, weights_only=True)["step"]


@pytest.mark.slow
@needs_torchrun
@pytest.mark.parametrize("method", ["lora", "dp-lora"])
def test_a_killed_two_process_run_resumes_bit_for_bit(method, tiny_pipeline_dir, tmp_path):
    steps = 6
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = run(finetune_args(method, tiny_pipeline_dir, straight, steps), 2)
    assert done.returncode == 0, done.stderr[-3000:]

    killed_at = kill_after_checkpoint(finetune_args(method, tiny_pipeline_dir, resumed, steps), resumed, 2)
    assert killed_at < steps and not (resumed / "summary.json").exists()
    done = run([*finetune_args(method, tiny_pipeline_dir, resumed, steps), "--resume"], 2)
    assert done.returncode == 0, done.stderr[-3000:]

    assert json.loads((resumed / "summary.json").read_text())["resumed_from_step"] == killed_at
    a, _ = read_lora(straight / LORA_WEIGHT_NAME)
    b, _ = read_lora(resumed / LORA_WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "train_log.jsonl").read_text() == (resumed / "train_log.jsonl").read_text()
    assert (straight / "history.json").read_text() == (resumed / "history.json").read_text()


@needs_torchrun
@pytest.mark.slow
def test_processes_started_with_different_configs_are_refused_in_one_line(tiny_pipeline_dir, tmp_path):
    """torchrun gives every process the same arguments, so the two ranks are started by hand with
    torchrun's environment variables, rank 1 with another learning rate."""
    port = free_port()
    procs = []
    for rank, lr in ((0, "0.02"), (1, "0.03")):
        args = finetune_args("lora", tiny_pipeline_dir, tmp_path / "run", steps=1)
        args[args.index("--lr") + 1] = lr
        env = {**environment(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "privdiff", *args, "--distributed"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    errors = [line for line in outputs[0][1].splitlines() if line.strip()]
    assert len(errors) == 1 and "different configs" in errors[0], outputs[0][1]
    assert outputs[1][1].strip() == ""  # only rank 0 speaks
    assert not (tmp_path / "run" / "summary.json").exists()


def test_distributed_without_a_torchrun_launch_is_one_line(tiny_pipeline_dir, tmp_path, monkeypatch):
    from privdiff.cli import main

    for name in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    assert main(finetune_args("lora", tiny_pipeline_dir, tmp_path / "run", steps=1) + ["--distributed"]) == 2
    assert not (tmp_path / "run").exists()
