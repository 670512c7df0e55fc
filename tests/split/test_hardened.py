"""The hardened option (split-controlnet.md §10, §13 items 8–10): accounting, σ_eff of the best attacker, unbiasedness."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from privdiff.diffusion import signal_and_noise_floats, signal_and_noise_scales
from privdiff.errors import ConfigError
from privdiff.split.accounting import (
    ReleaseLedger,
    compose,
    gdp_delta,
    gdp_epsilon,
    mu_condition,
    mu_image,
    reference_formula_epsilon,
    release_mu,
    sigma_eff,
)
from privdiff.split.attacks.analytic import AnalyticAttack
from privdiff.split.attacks.base import AttackData, Observer, public_triples
from privdiff.split.client import clip_per_example
from privdiff.split.run import build_simulation
from privdiff.split.setup import load_triples
from tests.split.conftest import split_config

SD_SCHEDULE = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                            beta_schedule="scaled_linear").alphas_cumprod


@pytest.mark.parametrize("mu, epsilon", [(0.5, 1.99), (1, 4.38), (2, 10.00), (4, 24.38)])
def test_gdp_epsilon_matches_the_spec_vectors(mu, epsilon):
    value = gdp_epsilon(mu, 1e-5)
    assert value == pytest.approx(epsilon, abs=0.005)
    assert gdp_delta(mu, value) == pytest.approx(1e-5, rel=1e-6)


@pytest.mark.parametrize("t, ratio", [(0, 34.3), (5, 13.9), (100, 2.91), (300, 1.20), (500, 0.618), (900, 0.120),
                                      (999, 0.068)])
def test_signal_to_noise_of_the_sd_schedule(t, ratio):
    a, b = signal_and_noise_floats(SD_SCHEDULE, t)
    assert a / b == pytest.approx(ratio, rel=0.01)


@pytest.mark.parametrize("clip, t, s, releases, mu, epsilon", [
    (1, 900, 1, 1, 0.339, 1.29), (1, 900, 1, 10, 1.07, 4.74), (1, 999, 1, 10, 0.612, 2.50),
    (1, 500, 1, 1, 1.75, 8.48), (4, 999, 1, 1, 0.774, 3.26), (16, 999, 1, 1, 3.10, 17.4),
    (16, 999, math.inf, 1, 2.19, 11.2)])
def test_worked_table_of_the_spec(clip, t, s, releases, mu, epsilon):
    a, b = signal_and_noise_floats(SD_SCHEDULE, t)
    total = compose([mu_image(a=a, b=b, s=s, clip=clip)] * releases)
    assert total == pytest.approx(mu, rel=0.005)
    assert gdp_epsilon(total, 1e-5) == pytest.approx(epsilon, rel=0.01)


def test_epsilon_falls_with_noise_and_timestep_and_grows_with_releases():
    def eps(t, s, releases=1):
        return gdp_epsilon(release_mu(SD_SCHEDULE, t, target_noise=s, latent_clip=1.0) * math.sqrt(releases), 1e-5)

    by_noise = [eps(500, s) for s in (0.25, 0.5, 1, 2, 4, 16)]
    by_t = [eps(t, 1) for t in (100, 300, 500, 700, 900, 999)]
    by_releases = [eps(900, 1, n) for n in (1, 2, 5, 10, 100)]
    assert all(x > y for x, y in zip(by_noise, by_noise[1:]))
    assert all(x > y for x, y in zip(by_t, by_t[1:]))
    assert all(x < y for x, y in zip(by_releases, by_releases[1:]))
    assert sigma_eff(*signal_and_noise_floats(SD_SCHEDULE, 500), 0.0) == 0.0  # s = 0: the published protocol
    assert math.isinf(release_mu(SD_SCHEDULE, 500, target_noise=0.0, latent_clip=1.0))
    assert math.isinf(gdp_epsilon(math.inf, 1e-5))


def test_condition_protection_composes_with_the_image_release():
    only_image = release_mu(SD_SCHEDULE, 900, target_noise=1.0, latent_clip=1.0)
    both = compose([only_image, mu_condition(clip=1.0, noise=4.0)])
    assert both == pytest.approx(math.hypot(only_image, 0.5))
    assert math.isinf(mu_condition(clip=1.0, noise=0.0)) and math.isinf(mu_condition(clip=None, noise=4.0))


def test_reference_formula_values_of_the_spec():
    assert [round(reference_formula_epsilon(t), 2) for t in (0, 5, 100, 300)] == [13.18, 12.81, 10.62, 9.04]


def test_ledger_composes_per_example_and_predicts_the_worst_case():
    ledger = ReleaseLedger(SD_SCHEDULE, target_noise=1.0, latent_clip=1.0, condition_clip=None, condition_noise=0.0,
                           delta=1e-5)
    ledger.record([0, 1, 0], [900, 999, 950])
    summary = ledger.summary(t_start=900)
    expected = compose([release_mu(SD_SCHEDULE, t, target_noise=1.0, latent_clip=1.0) for t in (900, 950)])
    assert summary["worst_image_mu"] == pytest.approx(expected)
    assert summary["worst_image_epsilon"] == pytest.approx(gdp_epsilon(expected, 1e-5))
    assert math.isinf(summary["worst_epsilon"])  # the condition is unprotected: recoverable, no guarantee
    assert summary["max_releases"] == 2
    assert summary["predicted_worst_mu"] >= summary["worst_mu"]  # t_start is the worst timestep
    protected = ReleaseLedger(SD_SCHEDULE, target_noise=1.0, latent_clip=1.0, condition_clip=1.0,
                              condition_noise=4.0, delta=1e-5)
    protected.record([0, 1, 0], [900, 999, 950])
    assert protected.summary(900)["worst_mu"] == pytest.approx(math.hypot(expected, 0.5 * math.sqrt(2)))
    restored = ReleaseLedger(SD_SCHEDULE, target_noise=1.0, latent_clip=1.0, condition_clip=None, condition_noise=0.0,
                             delta=1e-5)
    restored.load_state_dict(ledger.state_dict())
    assert restored.summary(900) == summary


def test_clip_per_example_bounds_the_norm_and_leaves_small_latents():
    z = torch.randn(5, 4, 8, 8) * torch.tensor([0.01, 1, 2, 5, 10]).view(-1, 1, 1, 1)
    clipped = clip_per_example(z, 4.0)
    norms = clipped.flatten(1).norm(dim=1)
    assert (norms <= 4.0 + 1e-5).all()
    assert torch.equal(clipped[0], z[0])


def test_hardened_needs_a_clip_bound(tiny_pipeline_dir):
    with pytest.raises(ConfigError, match="latent_clip"):
        split_config(tiny_pipeline_dir, "protocol.target_noise=1")
    with pytest.raises(ConfigError, match="condition_clip"):
        split_config(tiny_pipeline_dir, "protocol.condition_noise=1")


def test_best_attacker_error_matches_sigma_eff(tiny_pipeline_dir, public_models):
    """§13.8, hardened: the optimal combination u = x_t − b/(1+s²)·n' leaves an error of σ_eff on z0."""
    s, t_start = 1.0, 600
    config = split_config(tiny_pipeline_dir, f"protocol.t_start={t_start}", f"protocol.target_noise={s}",
                          "protocol.latent_clip=1000", "protocol.send=x_t", "data.test_examples=64")
    observation, truth = Observer(config, public_models, load_triples(config, test=True), 5).next(64)
    attack = AnalyticAttack()
    attack.fit(AttackData(config, public_models, public_triples(config, 4)))
    z0 = attack.reconstruct(observation).diagnostics["latents"]["z0"]
    a, b = signal_and_noise_scales(public_models.scheduler.alphas_cumprod, truth.t)
    standardised = (z0 - truth.z0) / (b * s / (a * math.sqrt(1 + s * s)))  # error / σ_eff(t), per example
    assert float(standardised.std()) == pytest.approx(1.0, rel=0.10)
    naive = (observation.tensors["x_t"] - b * observation.tensors["target"]) / a - truth.z0
    assert float(naive.std()) > float((z0 - truth.z0).std())  # the naive subtraction is worse


def test_noisy_target_keeps_the_expected_gradient(tiny_pipeline_dir, public_models):
    """§13.10: over η, the mean server gradient with target n + η equals the gradient with n."""
    config = split_config(tiny_pipeline_dir, "train.request_size=2")
    server, transport = build_simulation(config, public_models)
    batch = server.receive(transport.exchange(server.requests())[0][1])
    parameters = [p for p in server.trainable if p.requires_grad]
    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(parameters)]

    def projected_gradient(target) -> float:
        batch.tensors["target"] = target
        server.optimizer.zero_grad(set_to_none=True)
        loss, _ = server.loss([batch])
        loss.backward()
        return float(sum((p.grad * d).sum() for p, d in zip(parameters, direction) if p.grad is not None))

    clean_target = batch.tensors["target"].copy()
    reference = projected_gradient(clean_target)
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([projected_gradient(clean_target + torch.randn(clean_target.shape, generator=g).numpy())
                          for _ in range(48)], dtype=torch.float64)
    half_width = 2.576 * float(draws.std()) / math.sqrt(len(draws))
    assert abs(float(draws.mean()) - reference) <= half_width
    assert float(draws.std()) > 0  # the noise does reach the gradient: only its mean is unchanged


def test_epsilon_of_weak_settings_is_finite_not_an_overflow():
    """μ of several hundred (no clipping to speak of, small t) gives a huge but finite ε."""
    values = [gdp_epsilon(mu, 1e-5) for mu in (50.0, 628.0, 5000.0)]
    assert all(math.isfinite(v) for v in values) and values == sorted(values)
    assert values[0] == pytest.approx(50 ** 2 / 2 + 50 * 4.26, rel=0.05)  # ≈ μ²/2 + μ·z(δ) for large μ
