"""The diffusion training task: frozen encoders run once, the UNet trains on cached inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline

from privdiff.data.examples import ImageDataset


@dataclass
class DiffusionTask:
    """What a training method needs, independent of how the UNet is trained.

    Attributes:
        unet: the denoiser being trained (adapters attached by the method).
        scheduler: the training noise scheduler.
        latents: (N, C, h, w) clean latents of the training examples (VAE mean x scaling factor).
        contexts: (N, L, D) text-encoder states of their captions.
        null_context: (1, L, D) state of the empty prompt (caption dropout, guidance).
        example_ids: the N example ids, in row order.
    """

    unet: torch.nn.Module
    scheduler: object
    latents: torch.Tensor
    contexts: torch.Tensor
    null_context: torch.Tensor
    example_ids: list[str]

    @property
    def num_examples(self) -> int:
        return self.latents.shape[0]


@torch.no_grad()
def encode_images(pipe: StableDiffusionPipeline, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, C, h, w) latents, deterministic (posterior mean)."""
    factor = pipe.vae.config.scaling_factor
    chunks = [pipe.vae.encode(images[i:i + batch_size].to(pipe.vae.device)).latent_dist.mean * factor
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Prompts -> (N, L, D) last hidden states of the text encoder (padded to max length)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        tokens = pipe.tokenizer(prompts[i:i + batch_size], padding="max_length", truncation=True,
                                max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
        out.append(pipe.text_encoder(tokens.input_ids.to(pipe.text_encoder.device))[0])
    return torch.cat(out)


def build_task(pipe: StableDiffusionPipeline, dataset: ImageDataset) -> DiffusionTask:
    """Encodes `dataset` once with the pipeline's frozen VAE and text encoder."""
    return DiffusionTask(unet=pipe.unet, scheduler=pipe.scheduler,
                         latents=encode_images(pipe, dataset.images_tensor()),
                         contexts=encode_prompts(pipe, dataset.captions()),
                         null_context=encode_prompts(pipe, [""]),
                         example_ids=[ex.id for ex in dataset.examples])
