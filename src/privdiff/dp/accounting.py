"""Privacy accounting for Poisson-subsampled Gaussian DP-SGD: pure functions, no training state.

The reporting accountant is Opacus' PRV (default) or RDP; the independent cross-check is the PLD
accountant of Google's `dp-accounting` (dp-lora.md §8). Opacus' `PrivacyEngine.get_epsilon` drops
`eps_error`, so the accountants are called directly.

Every ε is computed within bounded memory and time, whatever the history (weak-privacy settings
included, where PRV's discretised domain grows into tens of GiB):
- PRV's domain size is known before any array is built (Opacus derives it from RDP in
  milliseconds); above `PRV_MAX_POINTS` the PLD accountant answers instead, and the result says so.
- PLD's value grid is 1e-4 (the spec's) until ε is large, then 1e-6·ε_RDP, so its loss grid stays
  near a million points; the pessimistic discretisation keeps it an upper bound at any interval.
Measured (2 cores): PRV ~6 s at the cap; PLD ≤ 0.7 GiB and ≤ 2 s on the grid q ≤ 0.25, σ ≥ 0.3,
≤ 10^4 steps, where a fixed 1e-4 grid needed 3.7 GiB and 17 s (tests/dp/test_accounting.py).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from privdiff.errors import ConfigError

ACCOUNTANTS = ("prv", "rdp")
# A history entry as Opacus keeps it: (noise_multiplier, sample_rate, steps).
History = list[tuple[float, float, int]]

MEMORY_CAP_BYTES = 2 << 30  # what one ε may cost; the limits below keep every accountant under it
# Opacus PRV's peak memory per point of its discretised domain, and the largest domain it is given
# (measured: a process peak of 2.08 GiB at 7.8 M points, imports included; 6 M keeps it under 2 GiB).
PRV_BYTES_PER_POINT = 230
PRV_MAX_POINTS = 6_000_000
PLD_DISCRETIZATION = 1e-4  # the spec's value grid (dp-lora.md §8), used while ε_RDP <= 100
PLD_RELATIVE_DISCRETIZATION = 1e-6  # above that: interval = 1e-6·ε_RDP (relative change measured < 1e-5)
PLD_MAX_EPSILON = 1e6  # above it (σ -> 0) only RDP's bound is computed: there is no privacy to measure
SIGMA_RANGE = (0.05, 1e4)
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))  # Opacus' RDPAccountant.DEFAULT_ALPHAS  # where calibration searches; below 0.05 there is no privacy worth the name


class AccountingLimit(ArithmeticError):
    """The requested accountant cannot answer within the memory cap (callers fall back to PLD)."""


@dataclass(frozen=True)
class Epsilon:
    """An ε and the accountant that produced it."""

    value: float
    accountant: str  # prv | rdp | pld: the one whose number `value` is
    requested: str  # the accountant the run asked for
    note: str = ""  # why `accountant` differs from `requested` (empty when it does not)


@functools.lru_cache(maxsize=256)
def _rdp_per_step(sample_rate: float, noise_multiplier: float):
    """One step's RDP curve at Opacus' default orders. RDP composes by addition, so `steps` steps
    are this times `steps`, exactly what Opacus' RDPAccountant computes (compute_rdp multiplies the
    same way); cached because a training run asks for ε_RDP at every log step (~0.14 s each)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    return compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS)


def _steps_taken(history: History) -> History:
    return [(float(s), float(q), int(n)) for s, q, n in history if n > 0]


def prv_domain_points(history: History, delta: float, eps_error: float = 1e-3) -> int:
    """Size of the grid Opacus' PRV accountant would discretise this history on (cheap: RDP only).

    Mirrors `PRVAccountant._get_domain` (opacus 1.6): bound L from RDP at δ_error / 4, mesh
    eps_error / sqrt(S·log(12/δ_error)/2), δ_error = δ/1000 (Opacus' default).
    """
    from opacus.accountants.analysis.prv import (
        PoissonSubsampledGaussianPRV,
        compute_safe_domain_size,
    )

    history = _steps_taken(history)
    delta_error = delta / 1000
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    counts = [steps for _, _, steps in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # RDP's "optimal order" notes
        bound = compute_safe_domain_size(prvs, counts, eps_error=eps_error, delta_error=delta_error)
    mesh = eps_error / math.sqrt(sum(counts) * math.log(12 / delta_error) / 2)
    return int(2 * bound / mesh) + 2


def opacus_epsilon(history: History, delta: float, accountant: str = "prv", eps_error: float = 1e-3) -> float:
    """ε of a DP-SGD history under Opacus' PRV or RDP accountant (inf when any step had σ = 0).

    Args:
        history: (σ, q, steps) entries, composed in order.
        delta: target δ.
        accountant: "prv" (tight, default) or "rdp" (comparability with older work).
        eps_error: PRV's allowed ε error (its result is an upper bound about this much above PLD).

    Raises:
        AccountingLimit: PRV's domain exceeds `PRV_MAX_POINTS` (it would exceed the memory cap).
    """
    history = _steps_taken(history)
    if not history:
        return 0.0
    if any(s <= 0 for s, _, _ in history):
        return math.inf  # PRV raises OverflowError on σ = 0; there is no guarantee to report
    if accountant == "prv":
        from opacus.accountants import PRVAccountant

        points = prv_domain_points(history, delta, eps_error)
        if points > PRV_MAX_POINTS:
            raise AccountingLimit(f"PRV would discretise {points:.3g} points "
                                  f"(~{points * PRV_BYTES_PER_POINT / 2**30:.3g} GiB)")
        acc = PRVAccountant()
        acc.history = history
        with warnings.catch_warnings():  # its domain bound comes from RDP, which notes its orders
            warnings.simplefilter("ignore", UserWarning)
            return float(acc.get_epsilon(delta=delta, eps_error=eps_error))
    if accountant == "rdp":
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = sum(_rdp_per_step(q, sigma) * steps for sigma, q, steps in history)
        with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound stays valid
            warnings.simplefilter("ignore")
            value, _ = get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
        return float(value) if not math.isnan(value) else math.inf
    raise ConfigError(f"unknown accountant '{accountant}' (choose from: {', '.join(ACCOUNTANTS)})")


def pld_discretization(history: History, delta: float, finest: float = PLD_DISCRETIZATION) -> float:
    """The PLD value interval for this history: `finest` (the spec's 1e-4), coarser where ε is large.

    Raises:
        AccountingLimit: ε_RDP above `PLD_MAX_EPSILON` (the interval would pass 1, and the loss
            grid of a σ that small would not fit the cap).
    """
    rdp = opacus_epsilon(history, delta, "rdp")
    if rdp > PLD_MAX_EPSILON:
        raise AccountingLimit(f"PLD needs a value grid coarser than 1 here (RDP's ε is {rdp:.3g})")
    return max(finest, PLD_RELATIVE_DISCRETIZATION * rdp)


def pld_epsilon(history: History, delta: float, discretization: float | None = None) -> float:
    """ε of the same history by `dp-accounting`'s PLD accountant (the independent cross-check).

    Args:
        discretization: the value interval; None picks `pld_discretization` (bounded memory).
    """
    import dp_accounting

    history = _steps_taken(history)
    if any(s <= 0 for s, _, _ in history):
        return math.inf
    if not history:
        return 0.0
    interval = discretization or pld_discretization(history, delta)
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=interval)
    for sigma, q, steps in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(acc.get_epsilon(delta))


def _epsilon_by(name: str, history: History, delta: float, eps_error: float) -> float:
    """ε by one accountant: "prv", "rdp" (Opacus) or "pld" (dp-accounting, bounded value grid)."""
    return pld_epsilon(history, delta) if name == "pld" else opacus_epsilon(history, delta, name, eps_error)


def _fallbacks(accountant: str) -> tuple[str, ...]:
    """The requested accountant, then PLD, then RDP (RDP never exceeds the cap)."""
    return tuple(dict.fromkeys((accountant, "pld", "rdp")))


def _reported(values: dict[str, float | None], notes: dict[str, str], accountant: str) -> Epsilon:
    """The first accountant of the fallback chain that answered, saying why the ones before it did not."""
    used = next(name for name in _fallbacks(accountant) if values.get(name) is not None)
    if used == accountant:
        return Epsilon(values[used], used, accountant)
    why = "; ".join(notes[name] for name in _fallbacks(accountant)[:_fallbacks(accountant).index(used)])
    return Epsilon(values[used], used, accountant, f"{why}: {used.upper()} reported instead")


def _limit_note(limit: AccountingLimit) -> str:
    return f"{limit}, over the {MEMORY_CAP_BYTES / 2**30:.0f} GiB cap"


def compute_epsilon(history: History, delta: float, accountant: str = "prv", eps_error: float = 1e-3) -> Epsilon:
    """ε by the requested accountant or, where it would exceed the memory cap, by PLD (then RDP's
    bound where even PLD would: ε above 1e6); `note` says which and why."""
    values: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    for name in _fallbacks(accountant):
        try:
            values[name] = _epsilon_by(name, history, delta, eps_error)
            break
        except AccountingLimit as limit:
            values[name], notes[name] = None, _limit_note(limit)
    return _reported(values, notes, accountant)


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
    accountant: str = "prv"  # the accountant whose ε that is (PLD when PRV exceeded the cap)


def calibrate_noise(target_epsilon: float, sample_rate: float, steps: int, delta: float, *,
                    accountant: str = "prv", eps_error: float = 1e-3) -> Calibration:
    """The σ whose ε under `accountant` lands in [0.99·target, target] (dp-lora.md §8).

    σ is rounded up to 4 significant digits before it is checked, so the σ returned is the σ used
    and its ε never exceeds the target. The search is Brent's method on log ε(log σ) with the PLD
    accountant (tenths of a second per call), aimed at the target minus the reporting accountant's
    measured offset, so the reporting accountant (seconds per call for PRV) is called about twice.

    Raises:
        ConfigError: the target needs σ above 1e4, or is so large that σ = 0.05 already meets it.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"target epsilon must be a finite number > 0 (got {target_epsilon})")

    def pld(sigma: float) -> float:
        """The search's ε: PLD on a 1e-3 grid (a few times faster), RDP's bound where ε passes 1e6."""
        history = [(sigma, sample_rate, steps)]
        try:
            return pld_epsilon(history, delta, pld_discretization(history, delta, finest=1e-3))
        except AccountingLimit:
            return opacus_epsilon(history, delta, "rdp")

    low, high = SIGMA_RANGE
    at_high, at_low = pld(high), pld(low)
    if at_high > target_epsilon:
        raise ConfigError(f"cannot reach epsilon {target_epsilon:g}: even noise multiplier {high:g} gives "
                          f"{at_high:.3g} (q={sample_rate:.4g}, {steps} steps, delta={delta:g})")
    if at_low <= target_epsilon:
        raise ConfigError(f"epsilon {target_epsilon:g} is above what noise multiplier {low:g} already gives "
                          f"({at_low:.3g}; q={sample_rate:.4g}, {steps} steps): that is no privacy worth "
                          f"calibrating; set the noise multiplier instead")
    aim = target_epsilon
    for _ in range(8):
        sigma = round_up(_solve(pld, aim, low, high))
        value = compute_epsilon([(sigma, sample_rate, steps)], delta, accountant, eps_error)
        if 0.99 * target_epsilon <= value.value <= target_epsilon:
            return Calibration(noise_multiplier=sigma, epsilon=value.value, target_epsilon=target_epsilon,
                               accountant=value.accountant)
        # Aim the PLD search lower (or higher) by the reporting accountant's offset at this σ.
        aim -= (value.value - target_epsilon * 0.997) * (1.2 if value.value > target_epsilon else 1.0)
        if aim <= pld(high):
            break
    raise ConfigError(f"cannot calibrate noise to epsilon {target_epsilon:g} (q={sample_rate:.4g}, {steps} steps, "
                      f"delta={delta:g}, accountant {accountant}): the accountants disagree too much at this "
                      f"epsilon; set the noise multiplier instead")


def _solve(epsilon_of: Callable[[float], float], target: float, low: float, high: float) -> float:
    """The σ in [low, high] with ε(σ) = target (ε falls in σ), by Brent's method in log-log space,
    nudged up until ε(σ) <= target."""
    from scipy.optimize import brentq

    def gap(log_sigma: float) -> float:
        return math.log(max(epsilon_of(math.exp(log_sigma)), 1e-300)) - math.log(target)

    sigma = math.exp(brentq(gap, math.log(low), math.log(high), xtol=1e-6, rtol=1e-6, maxiter=60))
    while epsilon_of(sigma) > target and sigma < high:
        sigma *= 1 + 1e-5
    return sigma


def compare_accountants(history: History, delta: float, accountant: str = "prv",
                        eps_error: float = 1e-3) -> dict:
    """ε of one history by PRV, PLD and RDP side by side, each timed, and which one is reported.

    Returns:
        {"reported": {epsilon, accountant, requested, note}, "accountants": {name: {epsilon,
        seconds, note | discretization | eps_error}}}; an accountant over the cap has `epsilon: None`.
    """
    rows: dict[str, dict] = {}
    for name in ("prv", "pld", "rdp"):
        began = time.perf_counter()
        row: dict = {"eps_error": eps_error} if name == "prv" else {}
        try:
            if name == "pld":
                row["discretization"] = pld_discretization(history, delta)
            row["epsilon"] = _epsilon_by(name, history, delta, eps_error)
        except AccountingLimit as limit:
            row["epsilon"], row["note"] = None, _limit_note(limit)
        rows[name] = {**row, "seconds": round(time.perf_counter() - began, 3)}
    reported = _reported({k: r["epsilon"] for k, r in rows.items()}, {k: r.get("note", "") for k, r in rows.items()},
                         accountant)
    return {"reported": {"epsilon": reported.value, "accountant": reported.accountant,
                         "requested": reported.requested, "note": reported.note}, "accountants": rows}
