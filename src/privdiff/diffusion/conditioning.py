"""SDXL's added conditioning packed into the context tensor, and the one UNet call that unpacks it.

An SDXL UNet (`addition_embed_type="text_time"`) reads, besides the token states (L, D), a pooled text
embedding (P) and six size/crop time ids. They travel inside the context: k = ⌈(P + 6) / D⌉ extra rows
after the L token states hold [pooled, time ids] flattened and zero-padded, so one example's
conditioning is one (L + k, D) row of `contexts`. Every path that indexes `contexts[rows]` (batches,
caption dropout, DP's per-example rows, the audit's candidates) works unchanged; `predict` unpacks.
Stable Diffusion 1.x/2.x contexts are (L, D) and reach the UNet exactly as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# Original (H, W), crop top-left (y, x), target (H, W): SDXL's micro-conditioning (Podell et al.
# 2023, arXiv 2307.01952, §2.2), in the order of diffusers' `_get_add_time_ids`.
NUM_TIME_IDS = 6


def unet_config(model: Callable) -> object | None:
    """The UNet config behind `model`: the UNet itself, Opacus' GradSampleModule (`_module`), DPDDP
    (`module`), or a callable carrying `config` (the functorch engine's); None if there is none."""
    while model is not None and not hasattr(model, "config"):
        inner = getattr(model, "_module", None)
        model = inner if inner is not None else getattr(model, "module", None)
    return getattr(model, "config", None)


def uses_added_conditioning(model: Callable) -> bool:
    """Whether the UNet behind `model` reads SDXL's pooled embedding and time ids."""
    return getattr(unet_config(model), "addition_embed_type", None) == "text_time"


def pooled_width(config) -> int:
    """P, the pooled text embedding's width, from the UNet config (the add-embedding's input is
    P + 6 · addition_time_embed_dim)."""
    return config.projection_class_embeddings_input_dim - NUM_TIME_IDS * config.addition_time_embed_dim


def num_added_rows(pooled: int, width: int) -> int:
    """k, the context rows that carry [pooled (P), time ids (6)] at context width D."""
    return math.ceil((pooled + NUM_TIME_IDS) / width)


def time_ids(height: int, width: int) -> torch.Tensor:
    """(6,) float time ids of an uncropped image trained and generated at (height, width) pixels,
    what `StableDiffusionXLPipeline` passes for that size."""
    return torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)


def pack_added_conditioning(hidden: torch.Tensor, pooled: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Appends [pooled, time ids] to the token states as k zero-padded rows.

    Args:
        hidden: (N, L, D) token states (both SDXL encoders' penultimate layers, concatenated).
        pooled: (N, P) pooled embedding of the second encoder.
        ids: (N, 6) time ids.

    Returns:
        (N, L + k, D) contexts, k = ⌈(P + 6) / D⌉, in `hidden`'s dtype.
    """
    n, _, width = hidden.shape
    rows = num_added_rows(pooled.shape[1], width)
    flat = torch.cat([pooled.to(hidden.dtype), ids.to(hidden.dtype)], dim=1)  # (N, P + 6)
    padded = torch.nn.functional.pad(flat, (0, rows * width - flat.shape[1]))  # (N, k·D)
    return torch.cat([hidden, padded.reshape(n, rows, width)], dim=1)


def unpack_added_conditioning(context: torch.Tensor, pooled: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Inverse of `pack_added_conditioning`: (N, L, D) token states and the UNet's `added_cond_kwargs`
    ({"text_embeds": (N, P), "time_ids": (N, 6)})."""
    rows = num_added_rows(pooled, context.shape[-1])
    flat = context[:, -rows:].reshape(context.shape[0], -1)  # (N, k·D)
    return context[:, :-rows], {"text_embeds": flat[:, :pooled], "time_ids": flat[:, pooled:pooled + NUM_TIME_IDS]}


def predict(unet: Callable, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The UNet's prediction (B, C, h, w) for x_t, t and a context of `contexts` (packed for SDXL).

    Args:
        unet: a `UNet2DConditionModel`, or a wrapper around one (see `unet_config`).
        noisy: (B, C, h, w) x_t.
        timesteps: (B,) integer timesteps.
        context: (B, L, D) token states, or (B, L + k, D) with SDXL's added conditioning packed in.
    """
    config = unet_config(unet)
    if getattr(config, "addition_embed_type", None) != "text_time":
        return unet(noisy, timesteps, encoder_hidden_states=context).sample
    hidden, added = unpack_added_conditioning(context, pooled_width(config))
    return unet(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


__all__ = ["NUM_TIME_IDS", "num_added_rows", "pack_added_conditioning", "pooled_width", "predict", "time_ids",
           "unet_config", "unpack_added_conditioning", "uses_added_conditioning"]
