"""DP-LoRA on a bf16 base: per-example norms, clipping and ε as in fp32 (the real-scale issue's acceptance).

The frozen UNet runs in bf16; LoRA parameters, per-example gradients, norms, clipping and noise stay
in fp32 (dp-lora.md §11.8).
"""

import json
from pathlib import Path

import pytest
import torch

from privdiff.config import DataConfig
from privdiff.data import load_dataset
from privdiff.diffusion.task import build_task
from privdiff.dp.per_example import ENGINES, per_example_norms
from privdiff.models.load import load_pipeline
from privdiff.training.run import run_training
from tests.conftest import tiny_run_config
from tests.dp.conftest import CONV_TARGETS, LINEAR_TARGETS
from tests.dp.test_per_example import clip_each, draws_for, lora_params


def task_in(pipeline_dir: Path, dtype: torch.dtype):
    pipe = load_pipeline(pipeline_dir, dtype=dtype)
    return build_task(pipe, load_dataset(DataConfig(name="digits", num_examples=12)))


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("targets", [LINEAR_TARGETS, CONV_TARGETS], ids=["linear", "conv"])
def test_bf16_per_example_norms_within_1e2_of_fp32_and_clipped_at_most_c(tiny_pipeline_dir, engine, targets):
    norms, clipped = {}, None
    for dtype in (torch.float32, torch.bfloat16):
        task = task_in(tiny_pipeline_dir, dtype)
        torch.manual_seed(0)
        params = lora_params(task, targets)
        assert all(p.dtype == torch.float32 for p in params.values())  # adapters stay fp32 on a bf16 base
        computed = ENGINES[engine](task.unet, task.unet, params, task.scheduler)
        computed.compute(draws_for(task, torch.arange(8), 2))
        assert all(p.grad_sample.dtype == torch.float32 for p in params.values())
        norms[dtype] = per_example_norms(list(params.values()))
        if dtype == torch.bfloat16:  # Opacus' clipping, one example at a time
            c = float(norms[torch.float32].median())  # about half of the examples get clipped
            clipped = torch.stack([row.norm() for row in clip_each(list(params.values()), c)[0]])
        computed.close()
    relative = (norms[torch.bfloat16] - norms[torch.float32]).abs() / norms[torch.float32]
    assert relative.max() <= 1e-2, relative
    assert (clipped <= c * (1 + 1e-5)).all() and (norms[torch.bfloat16] > c).any()


@pytest.mark.slow
def test_bf16_dp_run_records_device_and_precision_with_the_same_epsilon(tiny_pipeline_dir, tmp_path):
    settings = {"train.method": "dp-lora", "dp.target_epsilon": 4.0, "dp.epochs": 0.5, "data.num_examples": 16,
                "dp.expected_batch_size": 2, "dp.noise_multiplicity": 2, "sample.num_images": 1,
                "sample.num_inference_steps": 1}
    runs = {p: run_training(tiny_run_config(tmp_path / p, tiny_pipeline_dir, **settings, **{"runtime.precision": p}),
                            show_progress=False) for p in ("fp32", "bf16")}
    summaries = {p: json.loads((run / "summary.json").read_text()) for p, run in runs.items()}
    assert summaries["bf16"]["runtime"] == {"device": "cpu", "precision": "bf16"}
    assert summaries["bf16"]["privacy"]["epsilon"] == summaries["fp32"]["privacy"]["epsilon"]
    assert summaries["bf16"]["privacy"]["noise_multiplier"] == summaries["fp32"]["privacy"]["noise_multiplier"]
    assert summaries["bf16"]["privacy"]["max_grad_norm"] == summaries["fp32"]["privacy"]["max_grad_norm"]
