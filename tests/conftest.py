"""Shared fixtures: seeded tiny models built in code, a tiny image folder, and a network guard.

No test may touch the network: `HF_HUB_OFFLINE=1` is set before any Hugging Face import, and a
socket guard refuses every connection that does not go to the loopback interface.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from privdiff.config import RunConfig, load_config  # noqa: E402
from privdiff.models.tiny import TinySDConfig, build_tiny_pipeline  # noqa: E402

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


class NetworkBlocked(RuntimeError):
    pass


def _check_address(sock: socket.socket, address: object) -> None:
    if sock.family == socket.AF_UNIX:
        return
    host = address[0] if isinstance(address, tuple) else address
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        if host == "localhost":
            return
    raise NetworkBlocked(f"test tried to reach the network: {address!r}")


def _guarded_connect(self, address):
    _check_address(self, address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    _check_address(self, address)
    return _real_connect_ex(self, address)


def pytest_configure(config: pytest.Config) -> None:
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex


@pytest.fixture(autouse=True, scope="session")
def encoding_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """Commands under test cache their encodings in a temporary folder, never in the user's cache
    (child processes, e.g. torchrun ranks, inherit it)."""
    before = os.environ.get("PRIVDIFF_CACHE")
    os.environ["PRIVDIFF_CACHE"] = str(tmp_path_factory.mktemp("encodings"))
    yield
    if before is None:
        os.environ.pop("PRIVDIFF_CACHE", None)
    else:
        os.environ["PRIVDIFF_CACHE"] = before


# Smaller than the shipped base so that a fine-tuning step takes milliseconds.
TEST_MODEL = TinySDConfig(vae_channels=(8, 16, 16), unet_channels=(16, 32), cross_attention_dim=16,
                          attention_head_dim=4, text_layers=1)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded tiny Stable Diffusion pipeline saved with `save_pretrained` to a temporary folder."""
    folder = tmp_path_factory.mktemp("tiny-sd") / "pipeline"
    build_tiny_pipeline(TEST_MODEL, seed=0).save_pretrained(str(folder), safe_serialization=True)
    return folder


def tiny_run_config(tmp_path: Path, pipeline_dir: Path, **overrides: object) -> RunConfig:
    """A fast fine-tuning config on 32 digits with the tiny pipeline."""
    values = {"output_dir": str(tmp_path / "run"), "model.pretrained": str(pipeline_dir),
              "data.num_examples": 32, "train.steps": 6, "train.batch_size": 4,
              "train.checkpoint_every": 2, "train.log_every": 1, "sample.num_images": 4,
              "sample.num_inference_steps": 3, **overrides}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def write_image_folder(root: Path, n: int = 6, size: int = 20, mode: str = "RGB") -> Path:
    """A valid imagefolder dataset of `n` random images with captions."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        name = f"img_{i:02d}.png"
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(root / name)
        lines.append(json.dumps({"file_name": name, "text": f"a photo of object {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "data")


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: faster for small compute-bound tensors (split attacks), and
    the thread count a run's numbers are bit-reproducible at (CPU summation order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def finished_tiny_run(tiny_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished (6-step) fine-tuning run on 32 digits, shared by evaluation and report tests."""
    from privdiff.training.run import run_training

    tmp = tmp_path_factory.mktemp("finished")
    return run_training(tiny_run_config(tmp, tiny_pipeline_dir, **{"train.learning_rate": 0.05}),
                        show_progress=False)


FAST_EVAL = {"num_samples": 20, "num_inference_steps": 3, "bootstrap": 20, "kid_subsets": 5,
             "batch_size": 8}


def without_keys(value, unstable: set[str]):
    """`value` (nested dicts and lists) without the dict entries named in `unstable`, at any depth:
    what two runs that differ only in timings and run records have in common."""
    if isinstance(value, dict):
        return {k: without_keys(v, unstable) for k, v in value.items() if k not in unstable}
    if isinstance(value, list):
        return [without_keys(v, unstable) for v in value]
    return value
