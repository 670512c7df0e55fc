"""The schedule helper against the scheduler, and the loss attack against the training loss (issue 27)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

import privdiff
from privdiff.audit.attacks import LossThreshold
from privdiff.audit.model import Candidates, Denoiser
from privdiff.diffusion import (
    half_power,
    per_example_loss,
    signal_and_noise_floats,
    signal_and_noise_scales,
)
from privdiff.models.load import load_pipeline
from privdiff.models.tiny import build_scheduler

SCHEDULERS = {"tiny": build_scheduler(), "linear": DDPMScheduler(), "v": DDPMScheduler(prediction_type="v_prediction"),
              "cosine": DDPMScheduler(beta_schedule="squaredcos_cap_v2")}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scales_rebuild_the_schedulers_noisy_input(name):
    scheduler = SCHEDULERS[name]
    t = torch.arange(scheduler.config.num_train_timesteps)
    x0, noise = torch.randn(len(t), 4, 3, 3), torch.randn(len(t), 4, 3, 3)
    a, b = signal_and_noise_scales(scheduler.alphas_cumprod, t)
    assert a.shape == b.shape == (len(t), 1, 1, 1) and a.dtype == torch.float32
    assert torch.allclose(a * x0 + b * noise, scheduler.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)
    assert torch.allclose(a ** 2 + b ** 2, torch.ones_like(a))
    wide_a, wide_b = signal_and_noise_scales(scheduler.alphas_cumprod, t, torch.float64)
    assert wide_a.dtype == torch.float64 and torch.allclose(wide_a.float(), a) and torch.allclose(wide_b.float(), b)


def test_float_scales_are_the_float64_square_roots():
    alphas = build_scheduler().alphas_cumprod
    for t in (0, 1, 100, 500, 794, 999):  # at 794 the three square roots below do not all agree in the last bit
        alpha_bar = float(alphas[t])
        a, b = signal_and_noise_floats(alphas, t)
        assert (a, b) == (math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar))
        assert signal_and_noise_floats(alphas, t, sqrt=half_power) == (alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5)
        wide_a, wide_b = signal_and_noise_scales(alphas, torch.tensor([t]), torch.float64)
        assert (float(wide_a), float(wide_b)) == pytest.approx((a, b), rel=1e-15)
    assert math.isclose(sum(x * x for x in signal_and_noise_floats(alphas, 300)), 1.0)


def test_no_module_outside_diffusion_indexes_the_schedule():
    """`alphas_cumprod` is only passed on outside `privdiff.diffusion` (loss.py: "never re-derived")."""
    root = Path(privdiff.__file__).parent
    offenders = [str(path.relative_to(root)) for path in root.rglob("*.py")
                 if path.parent.name != "diffusion" and re.search(r"alphas_cumprod\s*\[", path.read_text())]
    assert offenders == []


@pytest.fixture(scope="module")
def tiny_unet_and_examples(tiny_pipeline_dir: Path):
    pipe = load_pipeline(tiny_pipeline_dir)
    generator = torch.Generator().manual_seed(0)
    n, channels = 5, pipe.unet.config.in_channels
    examples = Candidates([f"x{i}" for i in range(n)], torch.randn(n, channels, 8, 8, generator=generator),
                          torch.randn(n, 77, pipe.unet.config.cross_attention_dim, generator=generator))
    return pipe.unet, pipe.scheduler, examples


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_attack_scores_the_training_loss(tiny_unet_and_examples, prediction_type):
    unet, base, examples = tiny_unet_and_examples
    scheduler = DDPMScheduler.from_config(base.config, prediction_type=prediction_type)
    model = Denoiser(unet, scheduler)
    attack, t = LossThreshold(seed=3), 300
    scores = attack.score_at(model, examples, t)
    assert model.queries == attack.queries_per_example() * len(examples)
    steps = torch.full((len(examples),), t)
    total = torch.zeros(len(examples), dtype=torch.float64)
    noises = examples.noises(attack.seed, attack.num_noises)
    with torch.no_grad():
        for noise in noises:
            total += per_example_loss(unet, scheduler, examples.latents, examples.contexts, noise, steps).double()
        assert torch.equal(torch.from_numpy(scores), -(total / attack.num_noises))
        # the ε-MSE the attack scored before it used the training loss: the same numbers for ε, not for v
        eps_mse = sum(((model.eps(model.noisy(examples.latents, noise, t), t, examples.contexts) - noise) ** 2)
                      .mean(dim=(1, 2, 3)).double() for noise in noises)
    assert torch.equal(torch.from_numpy(scores), -(eps_mse / attack.num_noises)) == (prediction_type == "epsilon")
    # in batches the UNet's rounding may move, not the quantity
    batched = LossThreshold(seed=3).score_at(Denoiser(unet, scheduler, batch_size=2), examples, t)
    assert batched == pytest.approx(scores, rel=1e-5)
