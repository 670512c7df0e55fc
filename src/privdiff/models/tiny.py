"""Tiny diffusers models built in code: tests, the shipped base model and quick experiments.

Shapes follow Stable Diffusion at a reduced scale: 32x32 RGB images, a VAE with a 4x spatial
reduction to a 4x8x8 latent (so the per-example error feature of smp-lora.md §4 has 256 elements),
a UNet2DConditionModel on that latent and a 2-layer CLIP text encoder over the tiny tokenizer.
`build_tiny_sdxl_pipeline` builds the same at SDXL's layout: two text encoders whose states are
concatenated, and the UNet's added conditioning (pooled text embedding and size/crop time ids).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from privdiff.models.tokenizer import build_tokenizer


@dataclass(frozen=True)
class TinySDConfig:
    """Sizes of the tiny Stable-Diffusion-layout model (defaults: the shipped base)."""

    image_size: int = 32
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (16, 32, 32)  # 3 blocks -> 4x downsampling
    unet_channels: tuple[int, ...] = (32, 64)
    cross_attention_dim: int = 32
    attention_head_dim: int = 8
    text_layers: int = 2
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000


def build_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The Stable Diffusion noise schedule (scaled-linear betas 0.00085 -> 0.012, epsilon target)."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                         steps_offset=1)


def build_vae(cfg: TinySDConfig) -> AutoencoderKL:
    blocks = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=cfg.vae_channels,
                         down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, layers_per_block=1,
                         latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                         sample_size=cfg.image_size)


def build_unet(cfg: TinySDConfig, **extra: object) -> UNet2DConditionModel:
    """The tiny UNet; `extra` adds config keys (SDXL's added conditioning)."""
    latent_size = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cfg.cross_attention_dim, attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups, **extra)


def text_encoder_config(width: int, layers: int, vocab_size: int, bos: int, eos: int,
                        **extra: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=16,
                          bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, **extra)


def build_text_encoder(cfg: TinySDConfig, vocab_size: int, bos: int, eos: int) -> CLIPTextModel:
    return CLIPTextModel(text_encoder_config(cfg.cross_attention_dim, cfg.text_layers, vocab_size, bos, eos))


def build_tiny_pipeline(cfg: TinySDConfig = TinySDConfig(), seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised (seeded) text-to-image pipeline in the Stable Diffusion layout."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=build_vae(cfg), text_encoder=build_text_encoder(cfg, len(tokenizer), tokenizer.bos_token_id,
                                                            tokenizer.eos_token_id),
        tokenizer=tokenizer, unet=build_unet(cfg), scheduler=build_scheduler(cfg.num_train_timesteps),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class TinySDXLConfig(TinySDConfig):
    """Sizes of a tiny SDXL-layout model: each text encoder is `cross_attention_dim / 2` wide (their
    states are concatenated), and the second one's pooled projection is that wide too."""

    addition_time_embed_dim: int = 8

    @property
    def text_width(self) -> int:
        return self.cross_attention_dim // 2


def build_sdxl_unet(cfg: TinySDXLConfig) -> UNet2DConditionModel:
    # SDXL's add_embedding reads [pooled text embedding, 6 sinusoidally embedded time ids].
    return build_unet(
        cfg, addition_embed_type="text_time", addition_time_embed_dim=cfg.addition_time_embed_dim,
        projection_class_embeddings_input_dim=cfg.text_width + 6 * cfg.addition_time_embed_dim)


def build_tiny_sdxl_pipeline(cfg: TinySDXLConfig = TinySDXLConfig(), seed: int = 0) -> StableDiffusionXLPipeline:
    """A randomly initialised (seeded) text-to-image pipeline in the SDXL layout (no watermarker)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    ids = (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    text_encoder = CLIPTextModel(text_encoder_config(cfg.text_width, cfg.text_layers, *ids))
    text_encoder_2 = CLIPTextModelWithProjection(
        text_encoder_config(cfg.text_width, cfg.text_layers, *ids, projection_dim=cfg.text_width))
    pipe = StableDiffusionXLPipeline(
        vae=build_vae(cfg), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(), unet=build_sdxl_unet(cfg), scheduler=build_scheduler(cfg.num_train_timesteps),
        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pixel_unet(image_size: int = 32, channels: tuple[int, ...] = (32, 64),
                     num_class_embeds: int | None = None, seed: int = 0) -> UNet2DModel:
    """A pixel-space (no VAE) UNet, optionally class-conditional, for pixel-space experiments."""
    torch.manual_seed(seed)
    blocks = len(channels)
    return UNet2DModel(sample_size=image_size, in_channels=3, out_channels=3,
                       block_out_channels=channels, layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D",) * (blocks - 1) + ("AttnDownBlock2D",),
                       up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (blocks - 1),
                       num_class_embeds=num_class_embeds)


def build_controlnet(unet: UNet2DConditionModel, conditioning_channels: int = 3) -> ControlNetModel:
    """A ControlNet initialised from `unet` (the standard zero-convolution copy)."""
    block_out = unet.config.block_out_channels
    return ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=tuple(min(c, 16) for c in (16, 32, 64)[: len(block_out) + 1]),
        conditioning_channels=conditioning_channels)

