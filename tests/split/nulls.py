"""Whether a split attack "works", as a test against a stated null (issue 27, item 5), not a margin
tuned on one machine.

The null is the attacker without information: its reconstruction of victim i carries nothing of
victim i's own example. Each check compares a statistic over the N victims with the (1 − LEVEL)
quantile of that statistic under the null, one-sided, and `Check` keeps both, so that an assertion
message shows the room left:

- `retrieval`: how many reconstructions have their own truth nearest (MSE) among the N truths. Under
  the null which truth is a victim's own is exchangeable, so each finds it with probability 1/N, and
  the count is taken as Binomial(N, 1/N). For N = 8, 16 and 32 its threshold is 5, which the exact
  null of a one-to-one nearest-truth map (the fixed points of a random matching) also exceeds with
  probability below LEVEL (7.2e-4, 5.9e-4 and 5.9e-4).
- `mean_rank`: the mean rank of each victim's own truth among the N truths by distance (1 = nearest,
  ties at their mid-rank). Under the null the rank is uniform on 1..N, mean (N + 1) / 2; over a
  random matching the mean of the N ranks has standard deviation at most sqrt((N + 1) / 12) (the
  independent-rank value sqrt((N² − 1) / 12 / N) times sqrt(N / (N − 1)); Hoeffding's variance of
  a sum over a random permutation), and the threshold is the null mean less z(1 − LEVEL) of those.
- `paired_sign`: a sign test of two scores of the same victims (attack SSIM against the
  no-information baseline's, or against the attack's own earlier round): under the null "the first
  is not better" it beats the second for each victim with probability at most 1/2, so the count is
  at most Binomial(N, 1/2). A tie counts as not better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binom, norm

LEVEL = 1e-3  # one-sided, each check


@dataclass(frozen=True)
class Check:
    """A statistic and the null's (1 − LEVEL) quantile it must lie beyond (below when `lower`)."""

    name: str
    observed: float
    threshold: float
    n: int
    lower: bool = False

    @property
    def rejects(self) -> bool:
        return self.observed < self.threshold if self.lower else self.observed > self.threshold

    def __str__(self) -> str:
        side = "<" if self.lower else ">"
        return f"{self.name} {self.observed:.4g} (null threshold {side} {self.threshold:.4g}, N = {self.n})"


def distances(reconstruction: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(N, N) pixel MSE of reconstruction i against truth j, as `scoring.specificity` measures it."""
    r = reconstruction.detach().flatten(1).double()
    t = torch.as_tensor(truth).detach().flatten(1).double()
    return torch.cdist(r, t).pow(2) / r.shape[1]


def retrieval(reconstruction: torch.Tensor, truth: torch.Tensor) -> Check:
    """Top-1 retrieval count against Binomial(N, 1/N); a tie with the nearest counts as found (as in
    `specificity`)."""
    d = distances(reconstruction, truth)
    own = d.diagonal()
    count = int((own <= d.min(1).values * (1 + 1e-9)).sum())
    n = len(own)
    return Check("retrieval count", count, float(binom.ppf(1 - LEVEL, n, 1 / n)), n)


def mean_rank(reconstruction: torch.Tensor, truth: torch.Tensor) -> Check:
    """Mean rank of the own truth (1 + the truths strictly nearer + half the other truths as near)
    against (N + 1) / 2 less z(1 − LEVEL) · sqrt((N + 1) / 12)."""
    d = distances(reconstruction, truth)
    own = d.diagonal()[:, None]
    ranks = 1 + (d < own).sum(1) + 0.5 * ((d == own).sum(1) - 1)
    n = len(ranks)
    threshold = (n + 1) / 2 - norm.ppf(1 - LEVEL) * math.sqrt((n + 1) / 12)
    return Check("mean rank of the own truth", float(ranks.double().mean()), threshold, n, lower=True)


def paired_sign(better: np.ndarray, worse: np.ndarray, name: str = "victims better") -> Check:
    """How many victims score higher in `better` than in `worse`, against Binomial(N, 1/2)."""
    better, worse = np.asarray(better), np.asarray(worse)
    n = len(better)
    return Check(name, int((better > worse).sum()), float(binom.ppf(1 - LEVEL, n, 0.5)), n)


__all__ = ["LEVEL", "Check", "distances", "mean_rank", "paired_sign", "retrieval"]
