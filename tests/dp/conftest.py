"""Tiny DP fixtures: cached digit latents and a fresh copy of the tiny UNet per test."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from privdiff.config import DataConfig, RunConfig, load_config
from privdiff.data import load_dataset
from privdiff.models.load import load_pipeline
from privdiff.seeding import generator
from privdiff.training.loop import make_batch
from privdiff.training.methods import get_method
from privdiff.diffusion.task import DiffusionTask, build_task

LINEAR_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CONV_TARGETS = ["conv1", "conv2"]


@pytest.fixture(scope="session")
def encoded_digits(tiny_pipeline_dir: Path) -> DiffusionTask:
    pipe = load_pipeline(tiny_pipeline_dir)
    return build_task(pipe, load_dataset(DataConfig(name="digits", num_examples=32)))


def fresh_task(base: DiffusionTask, n: int) -> DiffusionTask:
    """The first n digits with a fresh, adapter-free copy of the tiny UNet."""
    return DiffusionTask(unet=copy.deepcopy(base.unet), scheduler=base.scheduler, latents=base.latents[:n],
                         contexts=base.contexts[:n], null_context=base.null_context,
                         example_ids=base.example_ids[:n])


@pytest.fixture
def make_task(encoded_digits: DiffusionTask):
    """`make_task(n)`: see `fresh_task`."""
    return lambda n=16: fresh_task(encoded_digits, n)


def dp_config(targets: list[str] | None = None, **dp: object) -> RunConfig:
    """A dp-lora config; `dp` keys override the dp section (fixed σ = 1 unless given)."""
    values = {"train.method": "dp-lora", "train.learning_rate": 0.01, "train.log_every": 1,
              "lora.rank": 2, "lora.alpha": 2.0, "dp.target_epsilon": None, "dp.noise_multiplier": 1.0,
              "dp.epochs": None, "train.steps": 4, **{f"dp.{k}": v for k, v in dp.items()}}
    overrides = [f"{k}={'null' if v is None else v}" for k, v in values.items()]
    if targets:
        overrides.append("lora.target_modules=[" + ", ".join(targets) + "]")
    return load_config(None, overrides)


def prepared_method(task: DiffusionTask, config: RunConfig):
    method = get_method("dp-lora")(config)
    torch.manual_seed(0)  # peft draws the Gaussian lora_A init from the global generator
    method.prepare(task)
    return method


def run_step(method, task: DiffusionTask, step: int, indices: torch.Tensor | None = None) -> dict:
    """One DP step at `step` (its Poisson batch, or `indices` when given)."""
    rng = generator(method.config.train.seed, "step", step)
    drawn = method.batch_indices(step, task.num_examples, rng)
    batch = make_batch(task, drawn if indices is None else indices, 0.0, rng)
    return method.step(task, batch, rng)


def capture_updates(method) -> list[list[torch.Tensor]]:
    """Records G/B (p.grad when the inner optimizer is called) instead of applying it."""
    updates: list[list[torch.Tensor]] = []
    inner = method.optimizer.original_optimizer

    def record(*args, **kwargs):
        updates.append([p.grad.detach().clone() for p in method.params])
    inner.step = record
    method._check_adapter_moved = lambda before: None  # nothing is applied, by design
    return updates


def zero_gradients(method):
    """Replaces the engine so every per-example gradient is zero (the update is pure noise)."""
    def compute(draws):
        for p in method.params:
            p.grad_sample = torch.zeros(draws.num_examples, *p.shape)
        return torch.zeros(draws.num_examples)
    method.engine.compute = compute
