"""Analytic recovery (split-controlnet.md §9.3, §13 item 8): the published protocol gives the latents away in closed form."""

from __future__ import annotations

import pytest
import torch

from privdiff.split.attacks import attack_class
from privdiff.split.attacks.analytic import (
    AnalyticAttack,
    condition_number,
    dense_least_squares,
    least_squares_through_conv,
)
from privdiff.split.attacks.base import AttackData, Observer, public_triples
from privdiff.split.attacks.scoring import per_example
from privdiff.split.setup import load_triples
from tests.split.conftest import split_config


def _attack(config, models, count=16, seed=3):
    observation, truth = Observer(config, models, load_triples(config, test=True), seed).next(count)
    attack = AnalyticAttack()
    attack.fit(AttackData(config, models, public_triples(config, 4)))
    return observation, truth, attack.reconstruct(observation)


def _decoded(models, latent: torch.Tensor) -> torch.Tensor:
    """The autoencoder reconstruction of what the client encoded (its posterior sample)."""
    with torch.no_grad():
        return ((models.vae.decode(latent / models.scaling_factor).sample + 1) / 2).clamp(0, 1)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_conjugate_gradients_match_dense_least_squares(public_models):
    conv = public_models.unet.conv_in
    x = torch.randn(3, conv.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = conv(x) + 0.01 * torch.randn(3, conv.out_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    cg, info = least_squares_through_conv(conv, y)
    dense = dense_least_squares(conv, y, (conv.in_channels, 8, 8))
    assert _relative(cg, dense) < 1e-5
    assert info["relative_residual"] <= 1e-8 and info["iterations"] < 500
    assert 1 <= condition_number(conv, (conv.in_channels, 8, 8)) < 1e3


@pytest.mark.parametrize("overrides", [
    ("protocol.t_start=0", "protocol.activation=identity", "protocol.precision=fp32"),  # unprotected
    (),                                                                                 # as published
])
def test_analytic_recovery_is_near_perfect_without_the_hardened_option(tiny_pipeline_dir, public_models, overrides):
    config = split_config(tiny_pipeline_dir, *overrides, "data.test_examples=16")
    observation, truth, result = _attack(config, public_models)
    latents = result.diagnostics["latents"]
    assert _relative(latents["x_t"], truth.x_t) < 1e-3
    assert _relative(latents["z0"], truth.z0) < 1e-3
    assert per_example(result.images, _decoded(public_models, truth.z0))["ssim"].mean() > 0.95
    # fp16 on h bounds the condition error by the cast's rounding; fp32 is exact to float precision
    assert _relative(latents["z_c"], truth.z_c) < (1e-2 if "protocol.precision=fp32" not in overrides else 1e-4)
    assert per_example(result.conditions, _decoded(public_models, truth.z_c))["ssim"].mean() > 0.95


def test_analytic_recovery_of_the_vanilla_image(tiny_pipeline_dir, public_models):
    config = split_config(tiny_pipeline_dir, "protocol.design=vanilla", "data.test_examples=8")
    _, truth, result = _attack(config, public_models, count=8)
    assert result.conditions is None  # the condition goes through the private hint block
    assert _relative(result.diagnostics["latents"]["z0"], truth.z0) < 1e-3


def test_registry_names_the_attacks():
    assert attack_class("analytic") is AnalyticAttack
    from privdiff.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown split attack"):
        attack_class("telepathy")
