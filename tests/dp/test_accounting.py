"""Accounting: Opacus PRV/RDP against dp-accounting's PLD, calibration, monotonicity (dp-lora.md §8, §13.5-7)."""

import itertools
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest

from privdiff.dp.accounting import calibrate_noise, opacus_epsilon, pld_epsilon, round_up
from privdiff.errors import ConfigError

DELTA = 1e-5
GRID = list(itertools.product((0.01, 0.05, 0.2), (0.7, 1.0, 2.0, 5.0), (10, 100, 1000)))


def grid_cell(cell: tuple[float, float, int]) -> tuple[float, float, float]:
    q, sigma, steps = cell
    history = [(sigma, q, steps)]
    return (pld_epsilon(history, DELTA), opacus_epsilon(history, DELTA, "prv", eps_error=1e-3),
            opacus_epsilon(history, DELTA, "rdp"))


def test_prv_agrees_with_independent_pld_over_the_grid():
    """The 36 cells of dp-lora.md §13.5, two at a time (PRV at ε ≈ 128 alone takes about a minute)."""
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        values = dict(zip(GRID, pool.map(grid_cell, GRID)))
    failures = []
    for cell, (pld, prv, rdp) in values.items():
        if rdp < 0.99 * pld:  # RDP is never tighter than PLD, on the whole grid
            failures.append((cell, "rdp", rdp, pld))
        # below ε_PLD = 0.3, PRV's absolute eps_error dominates the relative gap (specs/README.md)
        if pld >= 0.3 and (abs(prv - pld) > max(0.02 * pld, 1e-3 + 0.005) or abs(prv - pld) / pld > 0.02):
            failures.append((cell, "prv", prv, pld))
    assert sum(pld >= 0.3 for pld, _, _ in values.values()) >= 30
    assert not failures, failures


GOLDEN = [  # (q, steps, target) -> sigma, PRV eps_error 1e-3, delta 1e-5 (dp-lora.md §8)
    (0.1, 500, 1, 8.447), (0.1, 500, 4, 2.574), (0.1, 500, 8, 1.547),
    (0.05, 1000, 1, 5.997), (0.05, 1000, 4, 1.888), (0.05, 1000, 8, 1.191),
]


@pytest.mark.parametrize("q,steps,target,sigma", GOLDEN)
def test_calibration_reproduces_golden_table_and_lands_below_target(q, steps, target, sigma):
    result = calibrate_noise(target, q, steps, DELTA)
    assert abs(result.noise_multiplier - sigma) <= 0.01 * sigma
    assert 0.99 * target <= result.epsilon <= target
    # The σ returned is the σ used: re-accounting it gives the reported ε, never above target.
    assert opacus_epsilon([(result.noise_multiplier, q, steps)], DELTA) == pytest.approx(result.epsilon)
    assert result.noise_multiplier == round_up(result.noise_multiplier)


def test_round_up_to_four_significant_digits():
    assert round_up(2.5731) == 2.574
    assert round_up(2.573) == 2.573
    assert round_up(0.81529) == 0.8153
    assert round_up(12.3456) == 12.35


def test_epsilon_monotone_in_steps_sigma_and_rate():
    by_steps = [opacus_epsilon([(2.0, 0.1, s)], DELTA) for s in range(1, 41)]
    assert all(a <= b for a, b in zip(by_steps, by_steps[1:]))
    by_sigma = [opacus_epsilon([(s, 0.1, 20)], DELTA) for s in (0.8, 1.0, 1.5, 2.0, 4.0)]
    assert all(a >= b for a, b in zip(by_sigma, by_sigma[1:]))
    by_rate = [opacus_epsilon([(2.0, q, 20)], DELTA) for q in (0.01, 0.02, 0.05, 0.1, 0.2)]
    assert all(a <= b for a, b in zip(by_rate, by_rate[1:]))


def test_history_composes_like_one_entry():
    split = opacus_epsilon([(1.2, 0.1, 30), (1.2, 0.1, 20)], DELTA)
    assert split == pytest.approx(opacus_epsilon([(1.2, 0.1, 50)], DELTA), rel=1e-3)


def test_zero_noise_has_no_guarantee():
    assert math.isinf(opacus_epsilon([(0.0, 0.1, 5)], DELTA))
    assert math.isinf(pld_epsilon([(0.0, 0.1, 5)], DELTA))


def test_calibration_refuses_nonpositive_target():
    with pytest.raises(ConfigError):
        calibrate_noise(0.0, 0.1, 100, DELTA)
