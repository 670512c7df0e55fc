"""The contract every registered training method keeps, checked on each of them through the one loop:
two steps train the adapter, and a run stopped after one step and resumed from its checkpoint ends
bit for bit where the uninterrupted run does."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from privdiff.config import DataConfig, load_config
from privdiff.data import load_dataset
from privdiff.diffusion.task import DiffusionTask, EncodedSplit, build_task
from privdiff.models.load import load_pipeline
from privdiff.training.loop import train
from privdiff.training.methods import METHODS

# Small enough for milliseconds per step; DP with a fixed σ, K = 1 and every step's batch drawn.
CONFIG = ["train.steps=2", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=1",
          "train.learning_rate=0.01", "lora.rank=2", "lora.alpha=2", "dp.target_epsilon=null",
          "dp.noise_multiplier=1.0", "dp.epochs=null", "dp.expected_batch_size=4", "dp.noise_multiplicity=1",
          "smp.proxy_lr=0.001", "smp.proxy_batch_per_class=2", "smp.probe_every=1"]


@pytest.fixture(scope="module")
def encoded(tiny_pipeline_dir: Path) -> DiffusionTask:
    """16 digit members (8 aux, 8 test) and 4 examples of every other role a method may read, encoded once."""
    pipe = load_pipeline(tiny_pipeline_dir)
    digits = load_dataset(DataConfig(name="digits", num_examples=28))
    ids = [ex.id for ex in digits.examples]
    roles = {"member_aux": ids[:8], "member_test": ids[8:16], "nonmember_aux": ids[16:20],
             "nonmember_test": ids[20:24], "prior": ids[24:28]}
    return build_task(pipe, digits.subset(ids[:16]), {role: digits.subset(i) for role, i in roles.items()})


def fresh(task: DiffusionTask) -> DiffusionTask:
    """The same cached inputs with an untouched copy of the UNet."""
    return DiffusionTask(unet=copy.deepcopy(task.unet), scheduler=task.scheduler, latents=task.latents,
                         contexts=task.contexts, null_context=task.null_context, example_ids=task.example_ids,
                         splits={k: EncodedSplit(v.ids, v.latents, v.contexts) for k, v in task.splits.items()})


def trained(name: str, task: DiffusionTask, run_dir: Path, steps: int, resume: bool = False):
    """Trains a fresh method instance for `steps` steps (resuming from run_dir when asked)."""
    method = METHODS.get(name)(load_config(None, [f"train.method={name}", *CONFIG, f"train.steps={steps}"]))
    method.check_inputs(task.num_examples, task.unet)
    torch.manual_seed(0)  # peft's Gaussian lora_A init draws from the global generator
    result = train(task, method, run_dir, resume=resume, show_progress=False)
    weights = {k: v.detach().clone() for k, v in task.unet.named_parameters() if v.requires_grad}
    return weights, result


def test_the_registry_holds_every_method_under_its_cli_word():
    assert set(METHODS) == {"lora", "full", "dp-lora", "dreambooth-lora", "smp-lora", "mp-lora"}
    assert all(METHODS.get(name).name == name for name in METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_steps_train_and_a_resumed_run_ends_where_the_uninterrupted_one_does(name: str, encoded, tmp_path):
    straight, result = trained(name, fresh(encoded), tmp_path / "straight", steps=2)
    assert result.steps == 2 and len(result.history) == 2 and straight

    one_step, _ = trained(name, fresh(encoded), tmp_path / "resumed", steps=1)
    assert any(not torch.equal(straight[k], one_step[k]) for k in straight)  # the second step trained
    resumed, result = trained(name, fresh(encoded), tmp_path / "resumed", steps=2, resume=True)
    assert result.resumed_from == 1
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), name
