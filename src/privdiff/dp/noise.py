"""DP noise drawn on the CPU and moved to the gradients' device.

Opacus draws the Gaussian noise on the device of each gradient with the optimiser's generator, so
the same seed gives different noise on a GPU and on the CPU. privdiff keys every draw by
(seed, step) and draws it on the CPU: one config, the same noise on any device (and the same
numbers as Opacus' own `add_noise` on the CPU, draw for draw).
"""

from __future__ import annotations

import torch
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.optimizers.optimizer import (
    _check_processed_flag,
    _generate_noise,
    _mark_as_processed,
)


def _add_cpu_drawn_noise(optimizer: DPOptimizer) -> None:
    for p in optimizer.params:
        _check_processed_flag(p.summed_grad)
        shape_on_cpu = torch.empty(p.summed_grad.shape, dtype=p.summed_grad.dtype)
        noise = _generate_noise(std=optimizer.noise_multiplier * optimizer.max_grad_norm, reference=shape_on_cpu,
                                generator=optimizer.generator, secure_mode=optimizer.secure_mode)
        p.grad = (p.summed_grad + noise.to(p.summed_grad.device)).view_as(p)
        _mark_as_processed(p.summed_grad)


class CPUNoiseDPOptimizer(DPOptimizer):
    def add_noise(self) -> None:
        _add_cpu_drawn_noise(self)


class CPUNoiseDistributedDPOptimizer(DistributedDPOptimizer):
    def add_noise(self) -> None:
        if self.rank != 0:  # Opacus adds the noise once, on the first process; the all-reduce spreads it
            super().add_noise()
            return
        _add_cpu_drawn_noise(self)
