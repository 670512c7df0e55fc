"""Two processes writing the same run folder: the second is refused in one line while the first
trains, whatever it asks (--overwrite, --resume); once the first is gone (even by kill -9), the
folder is free again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privdiff.cli import main
from privdiff.runs.lock import LOCK_NAME, lock_run_folder, release_run_folder
from tests.adversarial.conftest import refused


def finetune_args(out: Path, pipeline: Path, steps: int) -> list[str]:
    return ["finetune", "--pretrained", str(pipeline), "--out", str(out), "--steps", str(steps), "--batch-size", "2",
            "--num-examples", "8", "--set", "sample.num_images=1", "--set", "sample.num_inference_steps=1",
            "--set", "train.checkpoint_every=5", "--quiet"]


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_trains(tmp_path: Path, tiny_pipeline_dir: Path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "privdiff", *finetune_args(out, tiny_pipeline_dir, 100000)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (out / "checkpoint.pt").exists() or first.poll() is not None)
        assert first.poll() is None, first.stderr.read().decode()
        before = sorted(p.name for p in out.iterdir() if not p.name.endswith(".tmp"))  # the writer's temp files come and go
        for extra in (["--overwrite"], ["--resume"]):
            message = refused(finetune_args(out, tiny_pipeline_dir, 100000) + extra, capsys)
            assert f"is being written by another privdiff process (pid {first.pid})" in message
        assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".tmp")) == before  # nothing removed
        assert first.poll() is None  # and the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel released the dead process's lock: the folder can be resumed or replaced at once
    assert main(finetune_args(out, tiny_pipeline_dir, 2) + ["--overwrite"]) == 0, capsys.readouterr().err
    assert (out / "summary.json").is_file() and (out / LOCK_NAME).exists()


def test_the_lock_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path: Path):
    folder = tmp_path / "run"
    lock_run_folder(folder)
    lock_run_folder(folder)  # a second take by the holder is a no-op
    probe = ("import sys\nfrom privdiff.runs.lock import lock_run_folder\n"
             "from privdiff.errors import ConfigError\n"
             f"try:\n    lock_run_folder({str(folder)!r})\nexcept ConfigError as e:\n    print(e); sys.exit(3)\n")
    held = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert held.returncode == 3 and f"pid {os.getpid()}" in held.stdout
    release_run_folder(folder)
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).returncode == 0
