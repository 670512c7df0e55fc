"""Post-hoc defences applied to a shared LoRA file (docs/design/weights-attack.md §8).

Three transformations of the UNet LoRA tensors, none with a formal guarantee:

- `weight-noise`: θ' = θ + N(0, (ρ·rms(θ))²), per tensor (A and B of every layer separately);
- `prune`: zero the fraction p of smallest-magnitude entries of each tensor;
- `rank`: keep the top k singular values of each layer's ΔW = (α/r)·B·A, re-factored and zero-padded
  to rank r so the file shape is unchanged.

`defend_layers` is the one implementation, used by `defend_file` (file in, file out) and by
in-memory callers (the adaptive attack defends shadow adapters during encoder training; build the
layers with `lora_math.layers_from_state_dict`). DP-LoRA, the training-time defence of the same
table, changes how the adapter is trained rather than the file, and lives with the DP training code
(docs/design/dp-lora.md), not here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from privdiff.errors import ConfigError, ModelError
from privdiff.models.inspect import ADAPTER_CONFIG_KEY, allowed, read_header
from privdiff.models.lora_math import (
    LoRALayer,
    read_text_encoder_lora,
    read_unet_lora,
    refactor,
    write_unet_lora,
)
from privdiff.registry import Registry

Knob = float | int | str


def _noisy(tensor: torch.Tensor, rho: float, generator: torch.Generator) -> torch.Tensor:
    rms = tensor.pow(2).mean().sqrt()
    noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype, device=tensor.device)
    return tensor + rho * rms * noise


def add_weight_noise(layers: Sequence[LoRALayer], rho: float, generator: torch.Generator) -> list[LoRALayer]:
    """θ' = θ + N(0, (ρ·rms(θ))²) for each tensor (A, then B, layer by layer, from `generator`).

    rms is taken over the tensor itself, so an all-zero tensor stays zero. `generator` must live on
    the tensors' device. Returns detached new layers.

    Raises:
        ConfigError: negative ρ.
    """
    if rho < 0:
        raise ConfigError(f"the weight-noise level ρ must be non-negative, got {rho}")
    return [replace(layer, down=_noisy(layer.down.detach(), rho, generator),
                    up=_noisy(layer.up.detach(), rho, generator)) for layer in layers]


def _pruned(tensor: torch.Tensor, fraction: float) -> torch.Tensor:
    count = math.floor(fraction * tensor.numel() + 0.5)
    flat = tensor.detach().flatten().clone()
    flat[flat.abs().argsort(stable=True)[:count]] = 0  # stable: ties in magnitude go to the lower index
    return flat.view_as(tensor)


def prune_by_magnitude(layers: Sequence[LoRALayer], fraction: float) -> list[LoRALayer]:
    """Zeroes, in each tensor, its round(p·n) smallest-magnitude entries (nearest integer, halves up).

    Exactly that many entries are zeroed (ties broken by position); entries that were already zero
    count among them. Returns detached new layers.

    Raises:
        ConfigError: p outside [0, 1].
    """
    if not 0 <= fraction <= 1:
        raise ConfigError(f"the pruned fraction must be in [0, 1], got {fraction}")
    return [replace(layer, down=_pruned(layer.down, fraction), up=_pruned(layer.up, fraction)) for layer in layers]


def _number(knob: Knob) -> float:
    try:
        return float(knob)
    except (TypeError, ValueError):
        raise ConfigError(f"a defence knob must be a number, got {knob!r}") from None


def _keep(knob: Knob, rank: int) -> int:
    """Singular values kept: an integer, or "r/2" (half the layer's rank, at least 1)."""
    if knob == "r/2":
        return max(1, rank // 2)
    value = _number(knob)
    if not value.is_integer():
        raise ConfigError(f"rank truncation keeps an integer number of singular values or 'r/2', got {knob!r}")
    return int(value)


def truncate_rank(layers: Sequence[LoRALayer], keep: int | str) -> list[LoRALayer]:
    """Replaces each layer's ΔW by its best rank-`keep` approximation, re-factored by SVD (`refactor`).

    The factors are zero-padded to the layer's rank r, so shapes and alpha are unchanged.

    Args:
        layers: the adapter.
        keep: 1..r, or "r/2".

    Raises:
        ConfigError: `keep` not an integer in 1..r nor "r/2".
    """
    truncated = []
    for layer in layers:
        up, down = refactor(layer.delta_weight(torch.float64), layer.rank, _keep(keep, layer.rank), layer.scale)
        truncated.append(replace(layer, up=up.to(layer.up.dtype), down=down.to(layer.down.dtype)))
    return truncated


@dataclass(frozen=True)
class LoRADefence:
    """A post-hoc defence of a shared LoRA file: `apply(layers, knob, generator)`, the spec's knob
    values and the knob's meaning."""

    name: str
    apply: Callable[[Sequence[LoRALayer], Knob, torch.Generator], list[LoRALayer]]
    knobs: tuple[Knob, ...]
    knob_name: str


DEFENCES: Registry[LoRADefence] = Registry("defence")
for _defence in (
    LoRADefence("weight-noise", lambda layers, knob, generator: add_weight_noise(layers, _number(knob), generator),
                (0.1, 0.3, 1.0, 3.0), "rho (noise std relative to the tensor's rms)"),
    LoRADefence("prune", lambda layers, knob, generator: prune_by_magnitude(layers, _number(knob)),
                (0.5, 0.9, 0.99), "p (fraction of entries zeroed per tensor)"),
    LoRADefence("rank", lambda layers, knob, generator: truncate_rank(layers, knob),
                (1, 2, "r/2"), "k (singular values kept per layer)"),
):
    DEFENCES.register(_defence)


def defend_layers(layers: Sequence[LoRALayer], defence: str, knob: Knob,
                  generator: torch.Generator) -> list[LoRALayer]:
    """Applies the named defence (a key of `DEFENCES`) with the given knob value; returns new layers.

    Args:
        layers: the adapter, e.g. from `read_unet_lora` or `layers_from_state_dict`.
        defence: "weight-noise", "prune" or "rank".
        knob: ρ, p or k (k may be "r/2"); strings holding numbers are accepted.
        generator: the randomness for weight noise (unused by the deterministic defences).

    Raises:
        ConfigError: unknown defence or invalid knob.
    """
    return DEFENCES.get(defence).apply(layers, knob, generator)


def defend_file(src: str | Path, dst: str | Path, defence: str, knob: Knob, seed: int | None = None) -> Path:
    """Reads a LoRA file (any format), applies a defence, writes `dst` atomically in diffusers format.

    The header of `dst` keeps only the allow-list of `privdiff inspect --scrub` (format, the LoRA
    config, `privdiff.*` fields such as DP parameters) plus `privdiff.defence` and
    `privdiff.defence.knob`. The seed is deliberately not recorded: it would let anyone regenerate
    and subtract the weight noise. A text-encoder adapter in diffusers or peft naming is defended
    too and kept; kohya's text-encoder layers (`lora_te_`) are dropped.

    Args:
        src: the LoRA file to defend.
        dst: the defended copy (must differ from `src`).
        defence: a key of `DEFENCES`.
        knob: the defence's knob value.
        seed: seeds the weight noise, for reproducible experiments; None draws fresh OS randomness
            (use that for a file you share: a guessable seed undoes the noise).

    Returns:
        `dst`.

    Raises:
        ModelError: unreadable or unsupported source, or `dst` is `src`.
        ConfigError: unknown defence or invalid knob.
    """
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ModelError("a defence writes a new file: give an output path other than the input")
    _, metadata, _ = read_header(src)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    defended = defend_layers(read_unet_lora(src), defence, knob, generator)
    # A text-encoder adapter is shared weights too: defended the same way, then carried along.
    text_encoder = read_text_encoder_lora(src)
    defended_te = defend_layers(text_encoder, defence, knob, generator) if text_encoder else []
    header = {k: v for k, v in metadata.items() if allowed(k) and k not in ("format", ADAPTER_CONFIG_KEY)}
    header.update({"privdiff.defence": defence, "privdiff.defence.knob": str(knob)})
    return write_unet_lora(dst, defended, header, text_encoder_layers=defended_te)


__all__ = ["DEFENCES", "LoRADefence", "add_weight_noise", "defend_file", "defend_layers", "prune_by_magnitude",
           "truncate_rank"]
