"""Per-example gradients of the K-draw mean denoising loss: the quantity DP-SGD clips.

Example i's loss is l_i = (1/K) Σ_k mse(ε_φ(x_t_ik, t_ik, c_i), target_ik) (dp-lora.md §4), and its
gradient g_i = ∇_φ l_i is what gets clipped, so one example moves the clipped sum by at most C
whatever K is (§5). Every engine writes g_i to `p.grad_sample` as ONE tensor (n, *p.shape) per
parameter, which is what Opacus' DPOptimizer reads (a list would be taken as accumulation).

- `HooksEngine`: the K draws are K rows of one batch through an Opacus
  `GradSampleModule`; its hooks give per-row gradients of l_i's K terms, which are summed inside
  each example (∇ is linear, so their sum is exactly g_i) before anything is clipped.
- `FunctorchEngine`: `vmap(grad(l_i))` over examples with the K draws as a mini-batch inside l_i
  (the spec's reference construction); used to cross-check the hooks engine.
- `LoRAEngine` (default): one plain forward and backward; each peft LoRA layer computes its per-example
  gradients in closed form inside its own backward (`privdiff.dp.lora_grads`), summing the K rows
  of each example there: no hooks, no activation capture, no p.grad. Linear layers with few tokens
  keep them implicit instead (ghost norms, `dp.ghost_norms`): per-example norms from Gram matrices,
  the clipped sum computed once the clip factors are known. K = 1 DP steps on 2 cores
  (`bench_dp.py --timing-only`, docs/dp-lora.md): 1.21x / 1.02x a plain LoRA step (demo /
  attention-only r8 adapter) against 1.62x / 1.26x for hooks; 0.97x at SD-1.5 size.
All randomness (t, noise) is drawn by the caller and passed in, so all are deterministic.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad_and_value, vmap

from privdiff.diffusion import noisy_and_target, squared_error
from privdiff.dp import lora_grads
from privdiff.errors import ModelError


@dataclass
class ExampleDraws:
    """A chunk of n examples and their K draws each.

    Attributes:
        latents: (n, C, h, w) clean latents.
        contexts: (n, L, D) caption states (SDXL: (n, L + k, D), added conditioning packed in).
        noise: (n, K, C, h, w) Gaussian noise.
        timesteps: (n, K) integer timesteps.
    """

    latents: torch.Tensor
    contexts: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor

    @property
    def num_examples(self) -> int:
        return self.latents.shape[0]

    @property
    def multiplicity(self) -> int:
        return self.noise.shape[1]

    def rows(self, scheduler) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, context, target) with the K draws of each example as consecutive rows (n·K)."""
        k = self.multiplicity
        latents = self.latents.repeat_interleave(k, dim=0)
        noise = self.noise.reshape(-1, *self.noise.shape[2:])
        timesteps = self.timesteps.reshape(-1)
        noisy, target = noisy_and_target(scheduler, latents, noise, timesteps)
        return noisy, timesteps, self.contexts.repeat_interleave(k, dim=0), target


class PerExampleEngine(ABC):
    """Computes g_i for a chunk and stores it on the trainable parameters as `grad_sample`."""

    def __init__(self, model: torch.nn.Module, unet: torch.nn.Module, params: dict[str, torch.nn.Parameter],
                 scheduler, ghost_norms: str = "never") -> None:
        """
        Args:
            model: what the forward goes through (the UNet, or DPDDP around it).
            unet: the bare UNet carrying the adapter.
            params: trainable LoRA tensors by their name in `unet`, in optimizer order.
            scheduler: the training noise scheduler (x_t and targets come from it).
            ghost_norms: auto | never | always: which linear LoRA layers keep their per-example
                gradients implicit (`lora_grads.GhostGradient`); only the lora engine has them.
        """
        self.model, self.unet, self.params, self.scheduler = model, unet, params, scheduler
        self.ghost_norms = ghost_norms
        self._owners = []  # (module, attribute, parameter): what `check_parameters` compares
        for name, p in params.items():
            owner, _, attr = name.rpartition(".")
            self._owners.append((unet.get_submodule(owner), attr, p))

    @abstractmethod
    def compute(self, draws: ExampleDraws) -> torch.Tensor:
        """Sets `p.grad_sample` = (n, *p.shape) for every parameter; returns the (n,) losses l_i."""

    def check_parameters(self) -> None:
        """The model must still hold the optimizer's Parameter objects (dp-lora.md §11.1); the DP
        step calls it once per step. Each tensor is looked up in the module that held it when the
        engine was built (a walk over the whole UNet would cost more than the rest of the DP
        bookkeeping on the demo adapter).

        Raises:
            ModelError: an adapter tensor was replaced (e.g. the model was moved to its device after
                the adapter was added): the optimizer would update tensors the model no longer uses.
        """
        if not self.model_holds_parameters():
            raise ModelError("the model's LoRA parameters were replaced after the DP optimizer was built "
                             "(move the model to its device before adding adapters)")

    def model_holds_parameters(self) -> bool:
        return all(owner._parameters.get(attr) is p for owner, attr, p in self._owners)

    def check_grad_samples(self, num_examples: int) -> None:
        """Every trainable tensor got its (n, *shape) per-example gradient.

        Raises:
            ModelError: one is missing or misshapen (a PEFT or Opacus change that bypasses the
                engine would otherwise leave DP-SGD adding noise to nothing, silently).
        """
        for name, p in self.params.items():
            ghost = getattr(p, "ghost", None)
            if ghost is not None and tuple(ghost.norm_sq.shape) == (num_examples,):
                continue
            sample = getattr(p, "grad_sample", None)
            if not isinstance(sample, torch.Tensor) or tuple(sample.shape) != (num_examples, *p.shape):
                got = "none" if not isinstance(sample, torch.Tensor) else tuple(sample.shape)
                raise ModelError(f"no per-example gradient for LoRA tensor {name} (expected "
                                 f"{(num_examples, *p.shape)}, got {got}): the per-example engine was bypassed")

    def backward_example_losses(self, model, draws: ExampleDraws) -> torch.Tensor:
        """One forward and backward of the n·K rows through `model` (the per-example machinery sits in
        it) with loss Σ_i l_i, l_i the mean of example i's K row losses; returns the (n,) l_i."""
        noisy, timesteps, contexts, target = draws.rows(self.scheduler)
        row_losses = squared_error(model, noisy, timesteps, contexts, target).mean(dim=(1, 2, 3))
        example_losses = row_losses.reshape(draws.num_examples, draws.multiplicity).mean(dim=1)
        example_losses.sum().backward()
        return example_losses.detach()

    def layer_choices(self) -> dict[str, str]:
        """How each LoRA layer produced its per-example gradients: "materialise" or "ghost"."""
        return {}

    def set_empty(self) -> None:
        """The empty Poisson batch: no forward, zero per-example rows (a noise-only step follows)."""
        for p in self.params.values():
            p.grad_sample = torch.zeros(0, *p.shape, dtype=p.dtype, device=p.device)
            p.ghost = None

    def close(self) -> None:
        """Removes anything attached to the model (sampling afterwards runs on the bare UNet)."""


class HooksEngine(PerExampleEngine):
    def __init__(self, model, unet, params, scheduler, ghost_norms: str = "never") -> None:
        super().__init__(model, unet, params, scheduler, ghost_norms)
        from opacus import GradSampleModule

        with warnings.catch_warnings():  # frozen norm layers are reported as "unsupported": they never train
            warnings.simplefilter("ignore")
            self.wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)

    def compute(self, draws: ExampleDraws) -> torch.Tensor:
        n, k = draws.num_examples, draws.multiplicity
        if n == 0:  # diffusers UNets fail on a 0-sized batch
            self.set_empty()
            return torch.zeros(0)
        for p in self.params.values():
            p.grad_sample, p.grad = None, None
        with warnings.catch_warnings():  # "full backward hook ... no inputs require gradients": expected
            warnings.simplefilter("ignore", UserWarning)
            example_losses = self.backward_example_losses(self.wrapped, draws)  # per-row: l_i's terms / K
        for p in self.params.values():
            p.grad_sample = p.grad_sample.reshape(n, k, *p.shape).sum(dim=1)
            p.grad = None
        return example_losses

    def close(self) -> None:
        self.wrapped._close()


class FunctorchEngine(PerExampleEngine):
    def compute(self, draws: ExampleDraws) -> torch.Tensor:
        n, k = draws.num_examples, draws.multiplicity
        if n == 0:  # diffusers UNets fail on a 0-sized batch
            self.set_empty()
            return torch.zeros(0)
        noisy, timesteps, contexts, target = draws.rows(self.scheduler)
        def per_example(rows: torch.Tensor) -> torch.Tensor:  # (n·K, ...) -> (n, K, ...)
            return rows.reshape(n, k, *rows.shape[1:])

        def example_loss(lora: dict[str, torch.Tensor], x, t, c, y) -> torch.Tensor:
            return squared_error(WithWeights(self.unet, lora), x, t, c, y).mean()

        weights = {name: p.detach() for name, p in self.params.items()}
        grads, losses = vmap(grad_and_value(example_loss), in_dims=(None, 0, 0, 0, 0))(
            weights, per_example(noisy), per_example(timesteps), per_example(contexts), per_example(target))
        for name, p in self.params.items():
            p.grad_sample = grads[name].detach()
        return losses.detach()


class LoRAEngine(PerExampleEngine):
    """Closed-form per-example gradients inside the LoRA layers' own backward (`lora_grads`): one
    ordinary forward and backward of the K·n rows, each layer summing its rows per example."""

    def __init__(self, model, unet, params, scheduler, ghost_norms: str = "never") -> None:
        super().__init__(model, unet, params, scheduler, ghost_norms)
        self.grouping = lora_grads.Grouping(ghost=self.ghost_norms)
        self.layers = lora_grads.attach(unet, self.grouping)

    def layer_choices(self) -> dict[str, str]:
        return dict(self.grouping.choices)

    def compute(self, draws: ExampleDraws) -> torch.Tensor:
        n = draws.num_examples
        if n == 0:  # diffusers UNets fail on a 0-sized batch
            self.set_empty()
            return torch.zeros(0)
        for p in self.params.values():
            p.grad_sample, p.grad, p.ghost = None, None, None
        self.grouping.num_examples = n
        try:
            return self.backward_example_losses(self.model, draws)
        finally:
            self.grouping.num_examples = None

    def close(self) -> None:
        lora_grads.detach(self.layers)


class WithWeights:
    """`unet` called with `weights` in place of its own tensors of those names (frozen weights come from
    the module); keeps the UNet's `config`, which `predict` reads (SDXL's added conditioning)."""

    def __init__(self, unet: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        self.unet, self.weights, self.config = unet, weights, unet.config

    def __call__(self, *args, **kwargs):
        return functional_call(self.unet, self.weights, args, kwargs)


ENGINES: dict[str, type[PerExampleEngine]] = {"hooks": HooksEngine, "functorch": FunctorchEngine,
                                               "lora": LoRAEngine}


def per_example_norms(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """(n,) flat L2 norms of the per-example gradients stored in `grad_sample`."""
    squares = [p.grad_sample.reshape(len(p.grad_sample), -1).pow(2).sum(dim=1) for p in params]
    return torch.stack(squares, dim=1).sum(dim=1).sqrt()
