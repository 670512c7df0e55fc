"""The timestep policy of the split client (split-controlnet.md §6.2): t ~ U{t_start, …, T − 1}.

x_t alone is a Gaussian mechanism on z0 whose signal-to-noise ratio falls with t, so leaving out
small t limits what x_t reveals. The draw uses the client's secret generator: t is sent in the
clear, but which example was noised how is the client's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from privdiff.errors import ConfigError


@dataclass(frozen=True)
class TimestepPolicy:
    t_start: int = 5
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if not 0 <= self.t_start < self.num_train_timesteps:
            raise ConfigError(f"t_start must be in [0, {self.num_train_timesteps - 1}], got {self.t_start}")

    @property
    def t_max(self) -> int:
        return self.num_train_timesteps - 1

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """(B,) int64 timesteps, uniform over [t_start, T − 1]."""
        return torch.randint(self.t_start, self.num_train_timesteps, (batch_size,), generator=generator)

    def contains(self, t: torch.Tensor) -> bool:
        return bool(((t >= self.t_start) & (t <= self.t_max)).all())


__all__ = ["TimestepPolicy"]
