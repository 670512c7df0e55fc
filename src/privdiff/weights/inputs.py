"""What the encoder reads from a LoRA adapter: the three input modes of weights-attack.md §5.

- `delta` (the faithful default): Delta theta = theta - theta_0. lora_B starts at zero, so only
  lora_A's initialisation must be known; the attacker is granted the default seeded init.
- `raw`: theta itself, nothing beyond the file.
- `canonical`: per layer the exact weight change (alpha/r) B A re-factored by SVD; independent of
  theta_0 and of the A/B gauge.

Every mode gives one (r, d) matrix per LoRA matrix (A as r x d_in, B^T as r x d_out), layers in
canonical (module-name) order, so a file and a live UNet give the same encoder inputs.
"""

from __future__ import annotations

from typing import Literal

import torch

from privdiff.seeding import generator
from privdiff.weights.lora_math import LoRALayer, canonical_layers

InputMode = Literal["delta", "raw", "canonical"]
INPUT_MODES: tuple[str, ...] = ("delta", "raw", "canonical")
DEFAULT_INIT_SEED = 0  # the "default seeded init" granted to the attacker in `delta` mode


def lora_modules(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The peft-adapted modules (adapter "default") of `unet`, in canonical (module-name) order."""
    modules = [(name, m) for name, m in unet.named_modules()
               if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]
    return sorted(modules, key=lambda item: item[0])


def live_layers(unet: torch.nn.Module) -> list[LoRALayer]:
    """The adapter attached to `unet` (peft, adapter "default") as detached layers, canonical order."""
    layers = []
    for name, module in lora_modules(unet):
        down = module.lora_A["default"].weight.detach().clone()
        up = module.lora_B["default"].weight.detach().clone()
        rank = down.shape[0]
        alpha = float(module.scaling["default"]) * rank
        layers.append(LoRALayer(name=name, down=down, up=up, alpha=alpha))
    return layers


@torch.no_grad()
def reset_lora(unet: torch.nn.Module, seed: int = DEFAULT_INIT_SEED) -> None:
    """Sets the adapter to theta_0 of `seed`: lora_A ~ N(0, (1/r)^2) (peft's "gaussian" init), lora_B = 0.

    Victims and shadows both start here, so `delta` mode's theta_0 is exactly what the attacker
    recomputes with `initial_layers`.
    """
    rng = generator(seed, "lora-init")
    modules = lora_modules(unet)
    if not modules:
        raise ValueError("the UNet carries no LoRA adapter")
    for _, module in modules:
        down = module.lora_A["default"].weight
        down.copy_(torch.randn(down.shape, generator=rng) / down.shape[0])
        module.lora_B["default"].weight.zero_()


def initial_layers(layers: list[LoRALayer], seed: int = DEFAULT_INIT_SEED) -> list[LoRALayer]:
    """theta_0 for adapters shaped like `layers` (the same draws as `reset_lora`, same order)."""
    rng = generator(seed, "lora-init")
    return [LoRALayer(name=layer.name, down=torch.randn(layer.down.shape, generator=rng) / layer.down.shape[0],
                      up=torch.zeros_like(layer.up), alpha=layer.alpha) for layer in layers]


def encoder_inputs(layers: list[LoRALayer], mode: InputMode,
                   initial: list[LoRALayer] | None = None) -> list[torch.Tensor]:
    """The (r, d) matrices the encoder reads, two per layer (A, then B^T).

    Args:
        layers: the adapter, canonical order.
        mode: `delta`, `raw` or `canonical`.
        initial: theta_0 for `delta` mode (default: `initial_layers(layers)`).
    """
    if mode == "canonical":
        layers = canonical_layers(layers)
    elif mode == "delta":
        initial = initial if initial is not None else initial_layers(layers)
        layers = [LoRALayer(name=layer.name, down=layer.down - start.down, up=layer.up - start.up,
                            alpha=layer.alpha) for layer, start in zip(layers, initial, strict=True)]
    elif mode != "raw":
        raise ValueError(f"unknown input mode '{mode}' (choose from: {', '.join(INPUT_MODES)})")
    matrices = []
    for layer in layers:
        matrices += [layer.down.float(), layer.up.float().T.contiguous()]
    return matrices


def matrix_shapes(layers: list[LoRALayer]) -> tuple[tuple[int, int], ...]:
    """(r, d) of each encoder input: the shape of the encoder's tokenizers."""
    shapes = []
    for layer in layers:
        shapes += [tuple(layer.down.shape), (layer.up.shape[1], layer.up.shape[0])]
    return tuple(shapes)


def batch_inputs(per_file: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Stacks the inputs of several files into one (B, r, d) tensor per matrix."""
    return [torch.stack(column) for column in zip(*per_file, strict=True)]
