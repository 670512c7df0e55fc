"""Privacy accounting for Poisson-subsampled Gaussian DP-SGD: pure functions, no training state.

The reporting accountant is Opacus' PRV (default) or RDP; the independent cross-check is the PLD
accountant of Google's `dp-accounting` (dp-lora.md §8). Opacus' `PrivacyEngine.get_epsilon` drops
`eps_error`, so the accountants are called directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from privdiff.errors import ConfigError

ACCOUNTANTS = ("prv", "rdp")
# A history entry as Opacus keeps it: (noise_multiplier, sample_rate, steps).
History = list[tuple[float, float, int]]


def _steps_taken(history: History) -> History:
    return [(float(s), float(q), int(n)) for s, q, n in history if n > 0]


def opacus_epsilon(history: History, delta: float, accountant: str = "prv", eps_error: float = 1e-3) -> float:
    """ε of a DP-SGD history under Opacus' PRV or RDP accountant (inf when any step had σ = 0).

    Args:
        history: (σ, q, steps) entries, composed in order.
        delta: target δ.
        accountant: "prv" (tight, default) or "rdp" (comparability with older work).
        eps_error: PRV's allowed ε error (its result is an upper bound about this much above PLD).
    """
    history = _steps_taken(history)
    if not history:
        return 0.0
    if any(s <= 0 for s, _, _ in history):
        return math.inf  # PRV raises OverflowError on σ = 0; there is no guarantee to report
    if accountant == "prv":
        from opacus.accountants import PRVAccountant

        acc = PRVAccountant()
        acc.history = history
        return float(acc.get_epsilon(delta=delta, eps_error=eps_error))
    if accountant == "rdp":
        import warnings

        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        acc.history = history
        with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound stays valid
            warnings.simplefilter("ignore", UserWarning)
            return float(acc.get_epsilon(delta=delta))
    raise ConfigError(f"unknown accountant '{accountant}' (choose from: {', '.join(ACCOUNTANTS)})")


def pld_epsilon(history: History, delta: float, discretization: float = 1e-4) -> float:
    """ε of the same history by `dp-accounting`'s PLD accountant (the independent cross-check)."""
    import dp_accounting

    history = _steps_taken(history)
    if any(s <= 0 for s, _, _ in history):
        return math.inf
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=discretization)
    for sigma, q, steps in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(acc.get_epsilon(delta))


def round_up(value: float, digits: int = 4) -> float:
    """`value` rounded up to `digits` significant digits (a larger σ never raises ε)."""
    if value <= 0:
        return value
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale - 1e-9) / scale


@dataclass(frozen=True)
class Calibration:
    noise_multiplier: float  # rounded up to 4 significant digits: the σ that is used
    epsilon: float  # reporting accountant's ε at that σ
    target_epsilon: float


def calibrate_noise(target_epsilon: float, sample_rate: float, steps: int, delta: float, *,
                    accountant: str = "prv", eps_error: float = 1e-3) -> Calibration:
    """The σ whose ε under `accountant` lands in [0.99·target, target] (dp-lora.md §8).

    σ is rounded up to 4 significant digits before it is checked, so the σ returned is the σ used
    and its ε never exceeds the target. The search runs on the PLD accountant (tenths of a second
    per call) aimed at the target minus the reporting accountant's measured offset, so the
    reporting accountant (seconds per call for PRV at eps_error 1e-3) is called about twice.

    Raises:
        ConfigError: the target cannot be met with σ <= 1e4.
    """
    if target_epsilon <= 0:
        raise ConfigError(f"target epsilon must be > 0 (got {target_epsilon})")

    def pld(sigma: float) -> float:
        return pld_epsilon([(sigma, sample_rate, steps)], delta, discretization=1e-3)

    def reporting(sigma: float) -> float:
        return opacus_epsilon([(sigma, sample_rate, steps)], delta, accountant, eps_error)

    aim = target_epsilon
    for _ in range(8):
        sigma = round_up(_bisect(pld, aim, rel_tol=2e-4))
        value = reporting(sigma)
        if 0.99 * target_epsilon <= value <= target_epsilon:
            return Calibration(noise_multiplier=sigma, epsilon=value, target_epsilon=target_epsilon)
        # Aim the PLD search lower (or higher) by the reporting accountant's offset at this σ.
        aim -= (value - target_epsilon * 0.997) * (1.2 if value > target_epsilon else 1.0)
        if aim <= 0:
            break
    raise ConfigError(f"cannot calibrate noise to epsilon {target_epsilon} (q={sample_rate}, {steps} steps, "
                      f"delta={delta}, accountant {accountant})")


def _bisect(epsilon_of: Callable[[float], float], target: float, rel_tol: float) -> float:
    """The smallest σ (to `rel_tol` in ε) with ε(σ) <= target, by bisection in log σ (ε falls in σ)."""
    low, high = 0.05, 1.0
    while epsilon_of(high) > target:
        low, high = high, high * 4
        if high > 1e4:
            raise ConfigError(f"cannot reach epsilon {target}: even noise multiplier {high:g} gives more")
    while epsilon_of(low) <= target and low > 1e-3:
        low /= 4
    for _ in range(80):
        mid = math.sqrt(low * high)
        value = epsilon_of(mid)
        if value > target:
            low = mid
        else:
            high = mid
            if value >= (1 - rel_tol) * target:
                break
        if high / low < 1 + 1e-7:
            break
    return high
