"""Closed-form per-example gradients of peft LoRA layers, computed inside their own backward.

A LoRA delta is y = s·B(A x). For the rows of example i (its K draws are K consecutive rows) and
their tokens t, with g_t = ∂L/∂y_t and h_t = A x_t:

    ∇B_i = s Σ g_t ⊗ h_t        ∇A_i = s Σ (Bᵀ g_t) ⊗ x_t

For a convolutional LoRA (lora_A: the base kernel, lora_B: 1x1) x_t is the unfolded patch at output
position t (computed as a grouped convolution's weight gradient, not by unfolding). `LoRADelta` saves x and h (what autograd keeps for a plain LoRA step anyway), computes
the per-example sums as batched matrix products in backward, and adds them to `p.grad_sample`
(n, *p.shape) instead of producing `p.grad`: no module hooks, no second copy of activations.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as lora_layers

from privdiff.errors import ModelError


@dataclass
class Grouping:
    """How many examples the current batch holds (None outside a per-example pass: plain forward),
    the ghost-norm policy, and each layer's choice (recorded the first time it runs)."""

    num_examples: int | None = None
    ghost: str = "auto"  # auto: by cost per layer | never | always (every linear LoRA)
    choices: dict[str, str] = field(default_factory=dict)  # layer name -> "ghost" | "materialise"


@dataclass
class GhostGradient:
    """A layer's per-example gradient kept implicitly (ghost clipping, Bu et al.'s book-keeping):
    its per-example squared norms now, and the clipped sum Σ_i c_i ∇_i once the clip factors c are
    known, from the activations and output gradients the backward already holds."""

    norm_sq: torch.Tensor  # (n,)
    clipped_sum: Callable[[torch.Tensor], torch.Tensor]  # c (n,) -> Σ_i c_i ∇_i, shaped like the parameter


def uses_ghost_norms(policy: str, tokens: int, rank: int, d_in: int, d_out: int) -> bool:
    """Ghost norms hold two (tokens × tokens) Gram matrices per example; materialising holds
    rank·(d_in + d_out) numbers: the cheaper one wins (Bu et al.'s per-layer rule)."""
    if policy == "auto":
        return tokens * tokens < rank * (d_in + d_out)
    return policy == "always"


def _gram_norm_sq(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(n,) ||Σ_t left_t ⊗ right_t||² per example, from Gram matrices: Σ_{t,t'} (l_t·l_t')(r_t·r_t')."""
    return (torch.bmm(left, left.transpose(1, 2)) * torch.bmm(right, right.transpose(1, 2))).sum(dim=(1, 2))


def _row_weighted_sum(left: torch.Tensor, right: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Σ_i c_i Σ_t left_it ⊗ right_it: one matrix product over all rows, each scaled by its example's c."""
    weighted = left * factors.to(left.dtype)[:, None, None]
    return weighted.flatten(0, 1).t() @ right.flatten(0, 1)


def _set_ghost(param: torch.nn.Parameter, ghost: GhostGradient) -> None:
    if getattr(param, "ghost", None) is not None:
        raise ModelError("a ghost-norm LoRA layer ran twice in one pass (its Gram matrices would miss the cross "
                         "terms); set dp.ghost_norms=never")
    param.ghost = ghost


def _add_grad_sample(param: torch.nn.Parameter, sample: torch.Tensor) -> None:
    """Accumulates (a layer called twice in one forward adds both calls' contributions)."""
    current = getattr(param, "grad_sample", None)
    param.grad_sample = sample if current is None else current + sample


def _per_example_conv_weight_grad(x: torch.Tensor, grad_h: torch.Tensor, weight: torch.Tensor, n: int,
                                  conv: tuple) -> torch.Tensor:
    """(n, *weight.shape): each example's conv weight gradient, its K rows summed.

    One grouped convolution backward with a group per example and the K rows as its batch
    (which the weight gradient sums over): 2-10x faster on CPU than unfolding the patches
    (F.unfold copies the input kernel-size times), and equal to it (tests/dp/test_per_example.py).
    """
    stride, padding, dilation = conv
    k = x.shape[0] // n
    def grouped(t: torch.Tensor) -> torch.Tensor:  # (n·K, c, h, w) -> (K, n·c, h, w): example i = group i
        return t.reshape(n, k, *t.shape[1:]).transpose(0, 1).reshape(k, n * t.shape[1], *t.shape[2:])

    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        grouped(grad_h), grouped(x), weight.repeat(n, 1, 1, 1), None, list(stride), list(padding),
        list(dilation), False, [0, 0], n, [False, True, False])
    return grad_weight.reshape(n, *weight.shape)


class LoRADelta(torch.autograd.Function):
    """s·B(A x) for a linear or conv LoRA; backward writes per-example gradients to `grad_sample`."""

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, scale, num_examples, conv, ghost=False):
        # conv: None for a linear LoRA, else (stride, padding, dilation) of lora_A
        if conv is None:
            h = F.linear(x, weight_a)
            y = F.linear(h, weight_b) * scale
        else:
            stride, padding, dilation = conv
            h = F.conv2d(x, weight_a, stride=stride, padding=padding, dilation=dilation)
            y = F.conv2d(h, weight_b) * scale
        ctx.save_for_backward(x, h, weight_a, weight_b)
        ctx.scale, ctx.num_examples, ctx.conv, ctx.ghost = scale, num_examples, conv, ghost
        ctx.params = (weight_a, weight_b)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, h, weight_a, weight_b = ctx.saved_tensors
        n, scale, conv = ctx.num_examples, ctx.scale, ctx.conv
        if x.shape[0] % max(n, 1) != 0:
            raise ModelError(f"a LoRA layer saw {x.shape[0]} rows for {n} examples: rows are not whole examples")
        if conv is None and ctx.ghost:
            grad_h = F.linear(grad_y, weight_b.t()) * scale  # (..., r)
            # detached: the clipped sums run after backward, in grad mode, and must not grow a graph
            g, hs = grad_y.detach().reshape(n, -1, grad_y.shape[-1]), h.detach().reshape(n, -1, h.shape[-1])
            gh, xs = grad_h.detach().reshape(n, -1, grad_h.shape[-1]), x.detach().reshape(n, -1, x.shape[-1])
            param_a, param_b = ctx.params
            _set_ghost(param_b, GhostGradient(_gram_norm_sq(g, hs) * scale**2,
                                              lambda c: _row_weighted_sum(g, hs, c) * scale))
            _set_ghost(param_a, GhostGradient(_gram_norm_sq(gh, xs), lambda c: _row_weighted_sum(gh, xs, c)))
            grad_x = F.linear(grad_h, weight_a.t()) if ctx.needs_input_grad[0] else None
            return grad_x, None, None, None, None, None, None
        if conv is None:
            grad_h = F.linear(grad_y, weight_b.t()) * scale  # (..., r)
            g = grad_y.reshape(n, -1, grad_y.shape[-1])
            grad_b = torch.bmm(g.transpose(1, 2), h.reshape(n, -1, h.shape[-1])) * scale
            grad_a = torch.bmm(grad_h.reshape(n, -1, grad_h.shape[-1]).transpose(1, 2), x.reshape(n, -1, x.shape[-1]))
            grad_x = F.linear(grad_h, weight_a.t()) if ctx.needs_input_grad[0] else None
        else:
            stride, padding, dilation = conv
            b = weight_b.reshape(weight_b.shape[0], -1)  # (d_out, r)
            grad_h = torch.einsum("nohw,or->nrhw", grad_y, b) * scale
            def by_example(t: torch.Tensor) -> torch.Tensor:  # (n·K, c, ...) -> (n, K, c, positions)
                return t.reshape(n, t.shape[0] // n, t.shape[1], -1)

            grad_b = torch.einsum("nkol,nkrl->nor", by_example(grad_y), by_example(h)).reshape(
                n, *weight_b.shape) * scale
            grad_a = _per_example_conv_weight_grad(x, grad_h, weight_a, n, conv)
            grad_x = (torch.nn.grad.conv2d_input(x.shape, weight_a, grad_h, stride=stride, padding=padding,
                                                 dilation=dilation) if ctx.needs_input_grad[0] else None)
        param_a, param_b = ctx.params
        _add_grad_sample(param_a, grad_a.to(param_a.dtype))
        _add_grad_sample(param_b, grad_b.to(param_b.dtype))
        return grad_x, None, None, None, None, None, None  # no p.grad: DP-SGD reads grad_sample only


def _per_example_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's vanilla LoRA forward with the delta computed by `LoRADelta` (inside a per-example pass)."""
    grouping: Grouping = layer._privdiff_grouping
    plain = (grouping.num_examples is None or layer.disable_adapters or layer.merged
             or kwargs.get("adapter_names") is not None)
    if plain:
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x, *args, **kwargs)
    result_dtype = result.dtype
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
        conv, ghost = None, False
        if isinstance(layer, lora_layers.Conv2d):
            conv = (lora_a.stride, lora_a.padding, lora_a.dilation)
        else:
            tokens = x.shape[0] // grouping.num_examples * math.prod(x.shape[1:-1])  # K draws × T tokens
            ghost = uses_ghost_norms(grouping.ghost, tokens, lora_a.weight.shape[0], lora_a.weight.shape[1],
                                     lora_b.weight.shape[0])
        grouping.choices.setdefault(layer._privdiff_name, "ghost" if ghost else "materialise")
        delta = LoRADelta.apply(x.to(lora_a.weight.dtype), lora_a.weight, lora_b.weight,
                                layer.scaling[adapter], grouping.num_examples, conv, ghost)
        result = result + delta
    return result.to(result_dtype)


def _check_supported(name: str, layer: torch.nn.Module) -> None:
    """Raises:
        ModelError: a LoRA layer kind or option the closed forms do not cover.
    """
    if not isinstance(layer, (lora_layers.Linear, lora_layers.Conv2d)) or getattr(layer, "fan_in_fan_out", False):
        raise ModelError(f"dp.engine=lora supports LoRA on Linear and Conv2d layers only ({name} is "
                         f"{type(layer).__name__}); use dp.engine=hooks")
    for adapter in layer.lora_A:
        lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
        if adapter in layer.lora_variant or lora_b.bias is not None or not isinstance(
                layer.lora_dropout[adapter], torch.nn.Identity):
            raise ModelError(f"dp.engine=lora supports plain LoRA only ({name}: DoRA/variants, LoRA bias or "
                             f"dropout); use dp.engine=hooks")
        if isinstance(layer, lora_layers.Conv2d) and (lora_a.groups != 1 or lora_b.groups != 1):
            raise ModelError(f"dp.engine=lora does not support grouped convolutions ({name}); use dp.engine=hooks")


def attach(model: torch.nn.Module, grouping: Grouping) -> list[torch.nn.Module]:
    """Routes every peft LoRA layer of `model` through `LoRADelta`; returns the layers (for `detach`).

    Raises:
        ModelError: a LoRA layer the closed forms do not cover.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, lora_layers.LoraLayer)]
    for name, layer in layers:
        _check_supported(name, layer)
    for name, layer in layers:
        layer._privdiff_grouping, layer._privdiff_name = grouping, name
        layer.forward = types.MethodType(_per_example_forward, layer)  # an instance attribute: undone by detach
    return [layer for _, layer in layers]


def detach(layers: list[torch.nn.Module]) -> None:
    for layer in layers:
        layer.__dict__.pop("forward", None)
        layer.__dict__.pop("_privdiff_grouping", None)
        layer.__dict__.pop("_privdiff_name", None)
