"""The diffusion training task: frozen encoders run once, the UNet trains on cached inputs.

Datasets are encoded in batches of exactly `ENCODE_BATCH` rows, the last one padded, in one memory
layout: CPU and GPU kernels choose their algorithm by batch size and memory layout, so an example's
latent would otherwise depend on how many others it was encoded with (last-bit differences, measured
on CPU: a batch of 1, or channels-last batches of 7, 33, 63 vs 64 rows). With a fixed batch size and
layout an example's row is the same in every subset, which lets the on-disk cache
(`privdiff.diffusion.cache`) serve any subset bit for bit, and makes the latents an audit scores
exactly the ones its run trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

import numpy as np
import torch
from diffusers import DiffusionPipeline

from privdiff.data.examples import ImageDataset, to_model_tensor
from privdiff.diffusion.cache import EncodingCache, encoder_key, tensor_bytes, weights_digest
from privdiff.diffusion.conditioning import (
    num_added_rows,
    pack_added_conditioning,
    pooled_width,
    time_ids,
    uses_added_conditioning,
)

ENCODE_BATCH = 64  # rows per encoder call of a dataset (latents and caption states)


@dataclass
class EncodedSplit:
    """Examples of one manifest role in model space."""

    ids: list[str]
    latents: torch.Tensor   # (n, C, h, w)
    contexts: torch.Tensor  # (n, L, D); SDXL: (n, L + k, D), added conditioning packed in

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index) -> "Self":
        """The examples at row positions `index` (same type)."""
        index = [int(i) for i in index]
        return type(self)([self.ids[i] for i in index], self.latents[index], self.contexts[index])

    @classmethod
    def join(cls, *parts: "EncodedSplit") -> "Self":
        return cls([i for p in parts for i in p.ids], torch.cat([p.latents for p in parts]),
                   torch.cat([p.contexts for p in parts]))


@dataclass
class DiffusionTask:
    """What a training method needs, independent of how the UNet is trained.

    Attributes:
        unet: the denoiser being trained (adapters attached by the method).
        scheduler: the training noise scheduler.
        latents: (N, C, h, w) clean latents of the training examples (VAE mean x scaling factor).
        contexts: (N, L, D) text-encoder states of their captions (SDXL: (N, L + k, D), the pooled
            embedding and time ids packed in by `privdiff.diffusion.conditioning`).
        null_context: (1, L, D) (SDXL: (1, L + k, D)) state of the empty prompt (caption dropout, guidance).
        example_ids: the N example ids, in row order.
        splits: other manifest roles a method reads (e.g. SMP-LoRA's auxiliary non-members),
            encoded the same way; keyed by role.
    """

    unet: torch.nn.Module
    scheduler: object
    latents: torch.Tensor
    contexts: torch.Tensor
    null_context: torch.Tensor
    example_ids: list[str]
    splits: dict[str, EncodedSplit] = field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return self.latents.shape[0]


@torch.no_grad()
def encode_images(pipe: DiffusionPipeline, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, C, h, w) latents, deterministic (posterior mean), fp32 on the CPU."""
    return torch.cat([vae_latents(pipe, images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def vae_latents(pipe: DiffusionPipeline, images: torch.Tensor) -> torch.Tensor:
    """One VAE call: (n, 3, H, W) in [-1, 1] -> (n, C, h, w), the posterior mean x scaling factor,
    fp32 on the CPU (the VAE may run elsewhere, in another precision)."""
    return pipe.vae.encode(images).latent_dist.mean.to("cpu", torch.float32) * pipe.vae.config.scaling_factor


def tokenize(pipe: DiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """Prompts -> (N, L) token ids, padded to the tokenizer's max length."""
    return pipe.tokenizer(prompts, padding="max_length", truncation=True,
                          max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompts(pipe: DiffusionPipeline, prompts: list[str], batch_size: int = 256,
                   text_encoder: torch.nn.Module | None = None,
                   resolution: tuple[int, int] | None = None) -> torch.Tensor:
    """Prompts -> (N, L, D) last hidden states of the text encoder (the pipeline's, or `text_encoder`),
    fp32 on the CPU.

    An SDXL pipeline gives (N, L + k, D): its own `encode_prompt` (both encoders' penultimate states,
    the second's pooled embedding) with the time ids of `resolution` packed in (`conditioning`).

    Args:
        resolution: (H, W) in pixels of the images the contexts go with (SDXL only; default: the
            pipeline's default generation size).
    """
    if uses_added_conditioning(pipe.unet):
        if text_encoder is not None:
            raise ValueError("a replacement text encoder is for Stable Diffusion 1.x/2.x pipelines only")
        return _encode_sdxl_prompts(pipe, prompts, batch_size, resolution)
    text_encoder = pipe.text_encoder if text_encoder is None else text_encoder
    out = []
    for i in range(0, len(prompts), batch_size):
        states = text_encoder(tokenize(pipe, prompts[i:i + batch_size]).to(text_encoder.device))[0]
        out.append(states.to("cpu", torch.float32))
    return torch.cat(out)


def _encode_sdxl_prompts(pipe: DiffusionPipeline, prompts: list[str], batch_size: int,
                         resolution: tuple[int, int] | None) -> torch.Tensor:
    height, width = resolution or (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
    out = []
    for i in range(0, len(prompts), batch_size):
        hidden, _, pooled, _ = pipe.encode_prompt(prompts[i:i + batch_size], device=pipe.text_encoder_2.device,
                                                  do_classifier_free_guidance=False)
        ids = time_ids(int(height), int(width)).expand(len(hidden), -1)
        out.append(pack_added_conditioning(hidden.to("cpu", torch.float32), pooled.to("cpu", torch.float32), ids))
    return torch.cat(out)


@torch.no_grad()
def in_fixed_batches(encode: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                     batch_size: int = ENCODE_BATCH) -> torch.Tensor:
    """`encode` over `inputs` in calls of exactly `batch_size` rows (the last padded with copies of its
    last row, dropped again), in one memory layout, so that a row's output does not depend on how
    many rows came with it (CPU kernels differ by batch size and layout, and a padded concatenation
    would otherwise lose `to_model_tensor`'s channels-last layout)."""
    out = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start:start + batch_size]
        pad = batch_size - len(batch)
        if pad:
            batch = torch.cat([batch, batch[-1:].expand(pad, *batch.shape[1:])])
        layout = torch.channels_last if batch.dim() == 4 else torch.contiguous_format
        out.append(encode(batch.contiguous(memory_format=layout))[:batch_size - pad])
    return torch.cat(out)


def dataset_latents(pipe: DiffusionPipeline, dataset: ImageDataset, cache: EncodingCache) -> torch.Tensor:
    """(N, C, h, w) latents of `dataset`'s images, each read from `cache` or encoded (and stored).

    A row's key is the hash of the image's pixels and size; the images of cached rows are never
    converted to model tensors."""
    vae = pipe.vae
    images = [ex.image for ex in dataset.examples]
    keys = [hashlib.sha256(f"{image.shape}".encode() + np.ascontiguousarray(image).tobytes()).hexdigest()
            for image in images]
    height, width = images[0].shape[:2]
    scale = pipe.vae_scale_factor
    row_shape = (vae.config.latent_channels, height // scale, width // scale)

    def encode(rows: list[int]) -> torch.Tensor:
        return in_fixed_batches(lambda batch: vae_latents(pipe, batch),
                                to_model_tensor(np.stack([images[i] for i in rows])))

    encoder = encoder_key("latents", vae, vae.config.scaling_factor, ENCODE_BATCH)
    return cache.rows(encoder, keys, row_shape, torch.float32, encode)


def caption_states(pipe: DiffusionPipeline, prompts: list[str], cache: EncodingCache,
                   resolution: tuple[int, int] | None = None) -> torch.Tensor:
    """(N, L, D) text-encoder states of `prompts` (SDXL: (N, L + k, D), packed with the time ids of
    `resolution`), each read from `cache` or encoded (and stored), fp32 on the CPU.

    A row's key is the hash of the prompt's token ids, the text encoder's exact input."""
    if uses_added_conditioning(pipe.unet):
        return _cached_sdxl_states(pipe, prompts, cache, resolution)
    text_encoder = pipe.text_encoder
    ids = tokenize(pipe, prompts)  # (N, L)
    keys = [hashlib.sha256(tensor_bytes(row)).hexdigest() for row in ids]
    row_shape = (ids.shape[1], text_encoder.config.hidden_size)

    def encode(rows: list[int]) -> torch.Tensor:
        return in_fixed_batches(lambda batch: text_encoder(batch)[0].to("cpu", torch.float32), ids[rows])

    encoder = encoder_key("contexts", text_encoder, ENCODE_BATCH)
    return cache.rows(encoder, keys, row_shape, torch.float32, encode)


def _cached_sdxl_states(pipe: DiffusionPipeline, prompts: list[str], cache: EncodingCache,
                        resolution: tuple[int, int] | None) -> torch.Tensor:
    """SDXL's packed caption states through the cache: keyed by both tokenizers' ids, for one resolution."""
    height, width = resolution or (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
    ids = torch.cat([tokenize(pipe, prompts), _tokenize_second(pipe, prompts)], dim=1)
    keys = [hashlib.sha256(tensor_bytes(row)).hexdigest() for row in ids]
    config = pipe.unet.config
    width_d = config.cross_attention_dim
    row_shape = (pipe.tokenizer.model_max_length + num_added_rows(pooled_width(config), width_d), width_d)
    encoder = encoder_key("contexts-sdxl", pipe.text_encoder_2, weights_digest(pipe.text_encoder),
                          int(height), int(width), ENCODE_BATCH)
    return cache.rows(encoder, keys, row_shape, torch.float32,
                      lambda rows: _encode_sdxl_prompts(pipe, [prompts[i] for i in rows], ENCODE_BATCH,
                                                        (height, width)))


def _tokenize_second(pipe: DiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    return pipe.tokenizer_2(prompts, padding="max_length", truncation=True,
                            max_length=pipe.tokenizer_2.model_max_length, return_tensors="pt").input_ids


def encode_split(pipe: DiffusionPipeline, dataset: ImageDataset,
                 kind: type[EncodedSplit] = EncodedSplit, cache: EncodingCache | None = None) -> EncodedSplit:
    """`dataset` in model space, as `kind` (EncodedSplit or a subclass such as the audit's Candidates).

    Args:
        cache: where rows are read and stored (default: in memory for this call only).
    """
    cache = EncodingCache() if cache is None else cache
    latents = dataset_latents(pipe, dataset, cache)
    return kind([ex.id for ex in dataset.examples], latents,
                caption_states(pipe, dataset.captions(), cache, _resolution(pipe, latents)))


def _resolution(pipe: DiffusionPipeline, latents: torch.Tensor) -> tuple[int, int]:
    """(H, W) in pixels of the images behind `latents` (SDXL's time ids)."""
    return tuple(side * pipe.vae_scale_factor for side in latents.shape[-2:])


def build_task(pipe: DiffusionPipeline, dataset: ImageDataset,
               splits: dict[str, ImageDataset] | None = None, cache: EncodingCache | None = None) -> DiffusionTask:
    """Encodes `dataset` (the members) and any extra `splits` once with the frozen VAE and text encoder.

    Args:
        cache: where rows are read and stored (default: in memory for this call only).
    """
    cache = EncodingCache() if cache is None else cache
    members = encode_split(pipe, dataset, cache=cache)
    return DiffusionTask(unet=pipe.unet, scheduler=pipe.scheduler, latents=members.latents,
                         contexts=members.contexts,
                         null_context=caption_states(pipe, [""], cache, _resolution(pipe, members.latents)),
                         example_ids=members.ids,
                         splits={role: encode_split(pipe, data, cache=cache) for role, data in (splits or {}).items()})
