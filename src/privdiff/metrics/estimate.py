"""The one result shape of privdiff: a number, its 95 % interval and the sample size behind it.

Metrics, the membership audit, split-learning attacks and the weights attack all report an
`Estimate`; in JSON it is `{"value": v, "ci": [low, high], "n": n}` ("n" when known), and
`format_estimate` is the one place that writes it for people (the CLI, the report card, the docs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from privdiff.metrics.intervals import clopper_pearson, mean_interval


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval.

    Attributes:
        value: the estimate (e.g. a mean, an AUC, a fraction).
        low, high: the ends of its 95 % interval (bootstrap or exact, as the producer documents).
        n: the sample size behind it (None when it is not one count, e.g. a two-sample statistic).
    """

    value: float
    low: float
    high: float
    n: int | None = None

    @classmethod
    def of_mean(cls, values, *, resamples: int = 200, seed: int = 0, key: str = "mean") -> "Estimate":
        """The mean of `values` with its seeded bootstrap interval (`metrics.intervals.mean_interval`)."""
        values = np.asarray(values, dtype=np.float64)
        low, high = mean_interval(values, resamples=resamples, seed=seed, key=key)
        return cls(float(values.mean()), low, high, int(values.size))

    @classmethod
    def of_fraction(cls, successes: int, trials: int) -> "Estimate":
        """successes / trials with its exact (Clopper-Pearson) interval."""
        low, high = clopper_pearson(successes, trials)
        return cls(successes / trials, low, high, trials)

    @classmethod
    def from_json(cls, entry: dict) -> "Estimate":
        low, high = entry["ci"]
        return cls(entry["value"], low, high, entry.get("n"))

    def to_json(self) -> dict:
        out = {"value": self.value, "ci": [self.low, self.high]}
        if self.n is not None:
            out["n"] = self.n
        return out

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high


def format_estimate(entry: "Estimate | dict | None", spec: str | Callable[[float], str] = ".3f", *,
                    interval: Callable[[str], str] = lambda text: text, missing: str = "–") -> str:
    """`value [low, high]`: how every interval is written for people.

    Args:
        entry: an `Estimate` or its JSON form; None gives `missing`.
        spec: a format spec for the three numbers (".3f", "+.3f", ".4g") or a function.
        interval: wraps the bracketed interval (the report card puts it in a span).
    """
    if entry is None:
        return missing
    estimate = entry if isinstance(entry, Estimate) else Estimate.from_json(entry)
    number = spec if callable(spec) else (lambda v: format(v, spec))
    return f"{number(estimate.value)} {interval(f'[{number(estimate.low)}, {number(estimate.high)}]')}"


__all__ = ["Estimate", "format_estimate"]
