"""Starting a Flower deployment of split learning: a SuperLink, one SuperNode per client, `flwr run`.

The same command lines serve `privdiff split server|client` and the loopback deployment that the
integration test and `privdiff split simulate --transport flower` start themselves (by PID, in a
private FLWR_HOME). Insecure mode is for loopback only; a real deployment adds TLS certificates
and SuperNode authentication (see docs/split.md).

`WireRecorder` is a TCP relay between the SuperNodes and the SuperLink that keeps the bytes that
cross it, so tests can check what actually travels between client and server machines.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from privdiff.errors import PrivdiffError

FLOWER_QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def app_dir() -> Path:
    """The folder holding the FAB's pyproject.toml (the code is the installed privdiff)."""
    return Path(str(resources.files("privdiff.split.flower") / "app"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    """A Flower executable next to this Python (the venv), else from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_environment(home: Path | None = None) -> dict[str, str]:
    """The environment Flower's processes need: the venv's bin on PATH (they spawn flower-superexec,
    flwr-serverapp and flwr-clientapp by bare name) and no telemetry or update checks (offline)."""
    env = {**os.environ, **FLOWER_QUIET_ENV,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if home is not None:
        env["FLWR_HOME"] = str(home)
    return env


def superlink_command(port: int, insecure: bool = True, host: str = "127.0.0.1") -> list[str]:
    return [_bin("flower-superlink"), *(["--insecure"] if insecure else []), "--host", host,
            "--port", str(port), "--disable-runtime-dependency-installation"]


def supernode_command(superlink: str, port: int, node_config: dict[str, object], insecure: bool = True) -> list[str]:
    pairs = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in node_config.items())
    return [_bin("flower-supernode"), *(["--insecure"] if insecure else []), "--superlink", superlink,
            "--host", "127.0.0.1", "--port", str(port), "--node-config", pairs]


def worker_command(socket_path: Path, node_config: dict[str, object]) -> list[str]:
    return [sys.executable, "-m", "privdiff.split.flower.worker", str(socket_path), json.dumps(node_config)]


def _wait_for_file(path: Path, timeout: float, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise PrivdiffError(f"{what} exited with code {process.returncode} while starting")
        if time.monotonic() > deadline:
            raise PrivdiffError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.1)


def write_run_config(path: Path, values: dict[str, object]) -> Path:
    """A TOML run-config file for `flwr run --run-config FILE` (strings as TOML basic strings)."""
    lines = [f"{k} = {json.dumps(v) if isinstance(v, str) else json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _wait_healthy(port: int, timeout: float, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PrivdiffError(f"{what} exited with code {process.returncode} while starting")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise PrivdiffError(f"{what} not healthy on port {port} after {timeout:.0f} s")


class WireRecorder:
    """A loopback TCP relay (listen port -> target port) that records both directions, up to a cap."""

    def __init__(self, target_port: int, cap_bytes: int = 32 << 20) -> None:
        self.target_port = target_port
        self.cap = cap_bytes
        self.up = bytearray()      # client (SuperNode) -> server (SuperLink)
        self.down = bytearray()
        self.total = {"up": 0, "down": 0}
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for src, dst, direction in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(target=self._pump, args=(src, dst, direction), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        buffer = self.up if direction == "up" else self.down
        try:
            while chunk := src.recv(1 << 16):
                with self._lock:
                    self.total[direction] += len(chunk)
                    room = self.cap - len(buffer)
                    if room > 0:
                        buffer.extend(chunk[:room])
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self._listener.close()


@dataclass
class LoopbackDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1 in a private FLWR_HOME, stopped by PID on exit."""

    root: Path | None = None
    record_wire: bool = False
    port: int | None = None        # the SuperLink's; None = a free one
    host: str = "127.0.0.1"
    processes: list[subprocess.Popen] = field(default_factory=list)
    recorder: WireRecorder | None = None

    def __enter__(self) -> "LoopbackDeployment":
        self._owns_root = self.root is None
        # absolute: FLWR_HOME and the processes' working directory are both this folder
        self.root = Path(tempfile.mkdtemp(prefix="privdiff-flower-")) if self.root is None else Path(self.root).resolve()
        self.home = self.root / "flwr-home"
        self.logs = self.root / "logs"
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = flower_environment(self.home)
        self.socket_dir = Path(tempfile.mkdtemp(prefix="pdsock-"))
        self.superlink_port = self.port or free_port()
        link = self._start(superlink_command(self.superlink_port, host=self.host), "superlink")
        _wait_healthy(self.superlink_port, 60, link, "flower-superlink")
        if self.record_wire:
            self.recorder = WireRecorder(self.superlink_port)
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{self.superlink_port}"\ninsecure = true\n')
        return self

    def _start(self, command: list[str], name: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(extra_env or {})},
                                   cwd=self.root)
        self.processes.append(process)
        return process

    @property
    def fleet_address(self) -> str:
        """Where SuperNodes connect: the recorder when recording, else the SuperLink itself."""
        return f"127.0.0.1:{self.recorder.port if self.recorder else self.superlink_port}"

    def add_supernode(self, name: str, node_config: dict[str, object], worker: bool = True) -> None:
        """Starts a SuperNode (and, by default, its resident client worker first)."""
        if worker:
            socket_path = self.socket_dir / f"{name}.sock"  # short path: AF_UNIX paths max ~107 bytes
            node_config = {**node_config, "worker-socket": str(socket_path)}
            process = self._start(worker_command(socket_path, node_config), f"{name}-worker",
                                  {"PRIVDIFF_WORKER_THREADS": "1"})  # loopback: all processes share the cores
            _wait_for_file(socket_path, 120, process, f"client worker {name}")
        port = free_port()
        process = self._start(supernode_command(self.fleet_address, port, node_config), name)
        _wait_healthy(port, 60, process, f"flower-supernode {name}")

    def run(self, run_config: dict[str, object], timeout: float) -> dict:
        """Submits the privdiff app with `flwr run` and waits until the run finishes; returns its status.

        Raises:
            PrivdiffError: the submission failed, the run failed, or it did not finish in time.
        """
        config_file = write_run_config(self.root / "run_config.toml", run_config)
        submitted = subprocess.run([_bin("flwr"), "run", str(app_dir()), "loopback", "--run-config", str(config_file),
                                    "--format", "json"], capture_output=True, text=True, env=self.env,
                                   cwd=self.root, timeout=120)
        try:
            run_id = json.loads(submitted.stdout[submitted.stdout.index("{"):])["run-id"]
        except (ValueError, KeyError):
            raise PrivdiffError(f"flwr run failed: {(submitted.stdout + submitted.stderr).strip()[-400:]}") from None
        deadline = time.monotonic() + timeout
        wait = 2.0
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if str(status.get("status", "")).startswith("finished"):
                if status["status"] != "finished:completed":
                    raise PrivdiffError(f"flower run {run_id} {status['status']}: {status.get('status-details', '')}"
                                        f" (logs in {self.logs})")
                return status
            # each `flwr ls` is a Python process (about 1 CPU-second): poll sparsely
            time.sleep(wait)
            wait = min(wait * 1.5, 15.0)
        raise PrivdiffError(f"flower run {run_id} did not finish within {timeout:.0f} s (logs in {self.logs})")

    def status(self, run_id: int) -> dict:
        listed = subprocess.run([_bin("flwr"), "ls", "loopback", "--run-id", str(run_id), "--format", "json"],
                                capture_output=True, text=True, env=self.env, cwd=self.root, timeout=60)
        try:
            runs = json.loads(listed.stdout[listed.stdout.index("{"):])["runs"]
        except (ValueError, KeyError):
            return {}
        return runs[0] if runs else {}

    def __exit__(self, *exc: object) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.recorder:
            self.recorder.close()
        _wait_superexecs_gone(self.superlink_port, timeout=15)
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        if self._owns_root and exc[0] is None:
            shutil.rmtree(self.root, ignore_errors=True)


def _wait_superexecs_gone(port: int, timeout: float) -> None:
    """flower-superexec children run in their own session and exit a few seconds after their parent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", "flower-superexec"], capture_output=True, text=True).stdout.split()
        if not found:
            return
        time.sleep(0.2)


__all__ = ["LoopbackDeployment", "flower_environment", "worker_command", "WireRecorder", "app_dir", "free_port", "superlink_command", "supernode_command",
           "write_run_config"]
