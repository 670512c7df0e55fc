"""Device and precision: resolution against the machine, refusals, and what runs where.

CI has no GPU, so the CUDA branches are exercised by telling torch what the machine has
(monkeypatched `torch.cuda`), and the low-precision path runs in bf16 on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from opacus.optimizers import DPOptimizer
from safetensors.torch import load_file

from privdiff.cli import main
from privdiff.config import RuntimeConfig
from privdiff.diffusion import per_example_loss
from privdiff.dp.noise import CPUNoiseDPOptimizer
from privdiff.errors import ConfigError
from privdiff.models.load import load_pipeline
from privdiff.runtime import resolve_device, resolve_precision, resolve_runtime
from privdiff.training.run import run_training
from tests.conftest import tiny_run_config


def fake_cuda(monkeypatch, count: int = 1, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")


def no_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    no_cuda(monkeypatch)
    assert resolve_runtime(RuntimeConfig()).device == torch.device("cpu")
    assert resolve_runtime(RuntimeConfig()).dtype == torch.float32


def test_auto_is_the_ranks_own_gpu_under_torchrun(monkeypatch):
    fake_cuda(monkeypatch, count=2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_auto_precision_is_bf16_on_a_gpu_that_has_it(monkeypatch):
    fake_cuda(monkeypatch, bf16=True)
    assert resolve_precision("auto", torch.device("cuda", 0)) == torch.bfloat16
    fake_cuda(monkeypatch, bf16=False)
    assert resolve_precision("auto", torch.device("cuda", 0)) == torch.float32


@pytest.mark.parametrize("spec, machine, message", [
    ("cuda", "none", "CUDA is not available"),
    ("cuda:7", "one", "has 1 CUDA device"),
    ("mps", "none", "no Apple MPS"),
    ("tpu", "none", "not one of"),
    ("cuda:x", "one", "not one of"),
])
def test_devices_the_machine_lacks_are_refused(monkeypatch, spec, machine, message):
    if machine == "none":
        no_cuda(monkeypatch)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    else:
        fake_cuda(monkeypatch, count=1)
    with pytest.raises(ConfigError, match=message):
        resolve_device(spec)


def test_fp16_refused_for_training_and_on_the_cpu(monkeypatch):
    with pytest.raises(ConfigError, match="needs a GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    fake_cuda(monkeypatch)
    assert resolve_precision("fp16", torch.device("cuda", 0)) == torch.float16  # sampling, audits
    with pytest.raises(ConfigError, match="loss scaling"):
        resolve_precision("fp16", torch.device("cuda", 0), training_method="dp-lora")
    fake_cuda(monkeypatch, bf16=False)
    with pytest.raises(ConfigError, match="does not support bf16"):
        resolve_precision("bf16", torch.device("cuda", 0))


@pytest.mark.parametrize("argv", [
    ["finetune", "--device", "cuda"],
    ["finetune", "--device", "cuda:7"],
    ["finetune", "--device", "mps"],
    ["finetune", "--precision", "fp16"],
])
def test_cli_refuses_a_missing_device_in_one_line_and_writes_nothing(monkeypatch, tmp_path, capsys, argv,
                                                                      tiny_pipeline_dir):
    no_cuda(monkeypatch)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    out = tmp_path / "run"
    code = main([*argv, "--pretrained", str(tiny_pipeline_dir), "--num-examples", "8", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    assert not out.exists()


@pytest.mark.parametrize("command", [["sample", "--prompt", "a digit"], ["evaluate", "RUN"], ["audit", "RUN"],
                                     ["demo"], ["early-stop", "RUN", "--match", "RUN", "--out", "OUT"]])
def test_every_model_command_takes_device(monkeypatch, tmp_path, capsys, command):
    no_cuda(monkeypatch)
    out = tmp_path / "out"
    argv = [str(out) if a in ("RUN", "OUT") else a for a in command]
    if command[0] in ("demo",):
        argv += ["--out", str(out)]
    code = main([*argv, "--device", "cuda"])
    assert code == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not out.exists()


def test_bf16_pipeline_takes_fp32_inputs_and_returns_an_fp32_loss(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir, dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 4, 4, generator=g)
    context = torch.randn(3, 77, pipe.unet.config.cross_attention_dim, generator=g)[:, :pipe.tokenizer.model_max_length]
    noise, t = torch.randn(latents.shape, generator=g), torch.tensor([10, 500, 900])
    loss = per_example_loss(pipe.unet, pipe.scheduler, latents, context, noise, t)
    assert loss.dtype == torch.float32 and loss.device.type == "cpu" and torch.isfinite(loss).all()
    reference = per_example_loss(load_pipeline(tiny_pipeline_dir).unet, pipe.scheduler, latents, context, noise, t)
    assert torch.allclose(loss, reference, rtol=0.05, atol=1e-3)


def test_dp_noise_drawn_on_the_cpu_equals_opacus_draw_for_draw():
    grads = [torch.randn(5, 3), torch.randn(7)]
    results = []
    for kind in (DPOptimizer, CPUNoiseDPOptimizer):
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        optimizer = kind(torch.optim.SGD(params, lr=0.0), noise_multiplier=1.3, max_grad_norm=0.5,
                         expected_batch_size=4, generator=torch.Generator().manual_seed(7))
        for p, g in zip(params, grads):
            p.grad_sample = g.unsqueeze(0).clone()
        optimizer.clip_and_accumulate()
        optimizer.add_noise()
        results.append([p.grad.clone() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "pytorch_lora_weights.safetensors"))


@pytest.mark.slow
def test_cpu_and_auto_give_bit_identical_adapters_on_a_cpu_machine(monkeypatch, tmp_path, tiny_pipeline_dir):
    no_cuda(monkeypatch)
    runs = [run_training(tiny_run_config(tmp_path / device, tiny_pipeline_dir, **{"runtime.device": device,
                                                                                   "train.steps": 3,
                                                                                   "data.num_examples": 16,
                                                                                   "sample.num_images": 1,
                                                                                   "sample.num_inference_steps": 1}),
                         show_progress=False) for device in ("cpu", "auto")]
    a, b = (_adapter(r) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((runs[1] / "summary.json").read_text())
    assert summary["runtime"] == {"device": "cpu", "precision": "fp32"}


@pytest.mark.parametrize("command", [["split", "simulate"], ["split", "attack", "--attack", "analytic"],
                                     ["split", "attack-grid"], ["attack", "weights"]])
def test_split_and_weights_commands_refuse_what_they_do_not_run_on(monkeypatch, tmp_path, capsys, command):
    no_cuda(monkeypatch)
    out = tmp_path / "out"
    assert main([*command, "--device", "cuda", "--out", str(out)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert main([*command, "--precision", "bf16", "--out", str(out)]) == 2
    assert "runs on the CPU in fp32" in capsys.readouterr().err
    assert not out.exists()


def test_the_fp32_adapter_loads_into_a_bf16_diffusers_pipeline(finished_tiny_run, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    adapter = finished_tiny_run / "pytorch_lora_weights.safetensors"
    assert all(t.dtype == torch.float32 for t in load_file(str(adapter)).values())  # as saved, whatever the base
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir), dtype=torch.bfloat16,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(adapter))
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())
    out = pipe.unet(torch.randn(1, 4, 4, 4, dtype=torch.bfloat16), torch.tensor([10]),
                    encoder_hidden_states=torch.randn(1, 8, pipe.unet.config.cross_attention_dim,
                                                      dtype=torch.bfloat16)).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
