"""The diffusion training task: frozen encoders run once, the UNet trains on cached inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Self

import torch
from diffusers import DiffusionPipeline

from privdiff.data.examples import ImageDataset
from privdiff.diffusion.conditioning import (
    pack_added_conditioning,
    time_ids,
    uses_added_conditioning,
)


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
    factor = pipe.vae.config.scaling_factor
    chunks = [pipe.vae.encode(images[i:i + batch_size]).latent_dist.mean.to("cpu", torch.float32) * factor
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


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


def encode_split(pipe: DiffusionPipeline, dataset: ImageDataset,
                 kind: type[EncodedSplit] = EncodedSplit) -> EncodedSplit:
    """`dataset` in model space, as `kind` (EncodedSplit or a subclass such as the audit's Candidates)."""
    images = dataset.images_tensor()
    return kind([ex.id for ex in dataset.examples], encode_images(pipe, images),
                encode_prompts(pipe, dataset.captions(), resolution=tuple(images.shape[-2:])))


def build_task(pipe: DiffusionPipeline, dataset: ImageDataset,
               splits: dict[str, ImageDataset] | None = None) -> DiffusionTask:
    """Encodes `dataset` (the members) and any extra `splits` once with the frozen VAE and text encoder."""
    members = encode_split(pipe, dataset)
    resolution = tuple(side * pipe.vae_scale_factor for side in members.latents.shape[-2:])
    return DiffusionTask(unet=pipe.unet, scheduler=pipe.scheduler, latents=members.latents,
                         contexts=members.contexts, null_context=encode_prompts(pipe, [""], resolution=resolution),
                         example_ids=members.ids,
                         splits={role: encode_split(pipe, data) for role, data in (splits or {}).items()})
