"""privdiff's DP optimizers: Opacus' DPOptimizer with the noise drawn on the CPU, and clipping that
keeps the per-example norms it computes (the step's metrics read them instead of computing them again).

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
    std = optimizer.noise_multiplier * optimizer.max_grad_norm
    for p in optimizer.params:
        _check_processed_flag(p.summed_grad)
        if optimizer.secure_mode or std == 0:
            noise = _generate_noise(std=std, reference=torch.empty(p.summed_grad.shape, dtype=p.summed_grad.dtype),
                                    generator=optimizer.generator, secure_mode=optimizer.secure_mode)
        else:  # what `_generate_noise` draws, without its two throw-away allocations
            noise = torch.normal(mean=0, std=std, size=p.summed_grad.shape, generator=optimizer.generator,
                                 dtype=p.summed_grad.dtype)
        p.grad = (p.summed_grad + noise.to(p.summed_grad.device)).view_as(p)
        _mark_as_processed(p.summed_grad)


class _Bookkeeping:
    """privdiff's engines store each `grad_sample` as one (n, *shape) tensor, checked every step
    (`PerExampleEngine.check_grad_samples`), so one pass is accumulated; Opacus re-derives that from
    every parameter for every parameter (quadratic: ~4 ms of a 50 ms step on the demo adapter).
    Clipping is Opacus' (same norms, same clip factors, same sums) with the norms kept."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.per_sample_norms: list[torch.Tensor] = []  # (n,) per clipped chunk; the caller empties it

    @property
    def accumulated_iterations(self) -> int:
        return 1

    def clip_and_accumulate(self) -> None:
        """Opacus' flat clipping over every tensor's per-example gradient, materialised (`grad_sample`)
        or ghost (`lora_grads.GhostGradient`: its squared norms and its clipped sum)."""
        ghosts = [getattr(p, "ghost", None) for p in self.params]
        samples = [None if g is not None else p.grad_sample.flatten(1) for p, g in zip(self.params, ghosts)]
        n = len(ghosts[0].norm_sq) if ghosts[0] is not None else len(samples[0])
        if n == 0:  # the empty Poisson batch: noise only
            norms = torch.zeros((0,), device=self.params[0].device)
            factors = norms
        else:
            if all(g is None for g in ghosts):  # exactly Opacus' arithmetic
                norms = torch.stack([s.norm(2, dim=-1) for s in samples], dim=1).norm(2, dim=1)
            else:
                squares = [g.norm_sq if g is not None else s.norm(2, dim=-1).square() for g, s in zip(ghosts, samples)]
                norms = torch.stack(squares, dim=1).sum(dim=1).sqrt()
            factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        self.per_sample_norms.append(norms.detach())
        for p, sample, ghost in zip(self.params, samples, ghosts):
            if ghost is not None:
                grad = ghost.clipped_sum(factors).to(p.dtype).view_as(p)
                p.ghost = None
            else:
                _check_processed_flag(p.grad_sample)
                grad = (factors.to(sample.device, p.dtype) @ sample.to(p.dtype)).view_as(p)  # Σ_i c_i g_i
                _mark_as_processed(p.grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad

    def pre_step(self, closure=None) -> bool:
        """Opacus' pre_step without its `grad_samples` probe (ghost tensors have no `grad_sample`)."""
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":
            torch._foreach_div_([p.grad for p in self.params], self.expected_batch_size)


class CPUNoiseDPOptimizer(_Bookkeeping, DPOptimizer):
    def add_noise(self) -> None:
        _add_cpu_drawn_noise(self)


class CPUNoiseDistributedDPOptimizer(_Bookkeeping, DistributedDPOptimizer):
    def add_noise(self) -> None:
        if self.rank != 0:  # Opacus adds the noise once, on the first process; the all-reduce spreads it
            super().add_noise()
            return
        _add_cpu_drawn_noise(self)
