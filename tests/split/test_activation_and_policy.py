import numpy as np
import pytest
import torch
from scipy import stats

from privdiff.errors import ConfigError
from privdiff.seeding import generator
from privdiff.split.activation import protect, symsigmoid, symsigmoid_inverse
from privdiff.split.timesteps import TimestepPolicy


def test_symsigmoid_matches_definition_is_odd_and_monotone():
    x = torch.linspace(-50, 50, 20001, dtype=torch.float64)
    y = symsigmoid(x)
    assert torch.allclose(y, x.abs() * (2 * torch.sigmoid(x) - 1), atol=1e-12)
    assert torch.equal(symsigmoid(-x), -y)
    assert bool((y[1:] > y[:-1]).all())


def test_symsigmoid_inverse_round_trip_in_fp32():
    x = torch.randn(200_000, generator=generator(0, "x")) * torch.logspace(-6, 3, 200_000)
    x = x.float()
    back = symsigmoid_inverse(symsigmoid(x))
    assert ((back - x).abs() <= 1e-6 * x.abs().clamp_min(1)).all()


def test_protect_casts_to_wire_precision_and_refuses_unknowns():
    z, x = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert protect(z, x, "symsigmoid", "fp16").dtype == torch.float16
    assert torch.equal(protect(z, x, "identity", "fp32"), z + x)
    with pytest.raises(ConfigError):
        protect(z, x, "relu", "fp16")


def test_timestep_policy_range_and_uniformity():
    policy = TimestepPolicy(t_start=50, num_train_timesteps=1000)
    t = policy.sample(95_000, generator(0, "t"))
    assert int(t.min()) == 50 and int(t.max()) == 999 and policy.contains(t)
    counts = np.bincount(t.numpy() - 50, minlength=950)
    assert stats.chisquare(counts).pvalue > 1e-3
    with pytest.raises(ConfigError):
        TimestepPolicy(t_start=1000)
