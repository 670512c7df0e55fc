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

from typing import Literal, get_args

import torch

from privdiff.models.lora_math import LoRALayer, canonical_layers, initial_layers

InputMode = Literal["delta", "raw", "canonical"]
INPUT_MODES: tuple[str, ...] = get_args(InputMode)


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
