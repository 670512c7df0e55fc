"""Pre-training the tiny base model on public data (glyphs), reproducibly.

Stage 1 trains the VAE (reconstruction + a small KL term) on glyphs and smooth random textures;
stage 2 trains the UNet on glyph latents through the shared loop (`FullUNet`), with caption
dropout so classifier-free guidance works. The text encoder stays at its seeded random
initialisation: a frozen random transformer still gives every prompt a distinct, stable
embedding, and keeps the recipe short.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from rich.progress import Progress

from privdiff.config import (
    ConfigRoot,
    RunConfig,
    TrainConfig,
    choice_checks,
    raise_first_failure,
)
from privdiff.data.builtin import load_glyphs
from privdiff.diffusion.task import build_task, encode_images
from privdiff.models.load import run_on, write_checksums
from privdiff.models.tiny import TinySDConfig, build_tiny_pipeline
from privdiff.runs.files import atomic_write_text
from privdiff.seeding import generator, seed_everything
from privdiff.training.loop import train
from privdiff.training.methods.lora import FullUNet


@dataclass(frozen=True)
class PretrainConfig(ConfigRoot):
    """The recipe of the shipped base model (`assets/tiny-sd-glyphs/RECIPE.yaml`)."""

    seed: int = 0
    num_glyphs: int = 20_000
    vae_steps: int = 1_500
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6
    texture_fraction: float = 0.25  # share of VAE batches that are smooth random textures
    unet_steps: int = 3_000
    unet_batch_size: int = 64
    unet_learning_rate: float = 5e-4
    caption_dropout: float = 0.1

    def validate(self) -> "PretrainConfig":
        """Raises ConfigError on the first invalid value."""
        raise_first_failure([
            *choice_checks(self),
            (min(self.num_glyphs, self.vae_steps, self.unet_steps) >= 1,
             "num_glyphs, vae_steps and unet_steps must be >= 1"),
            (min(self.vae_batch_size, self.unet_batch_size) >= 1, "vae_batch_size and unet_batch_size must be >= 1"),
            (min(self.vae_learning_rate, self.unet_learning_rate) > 0,
             "vae_learning_rate and unet_learning_rate must be > 0"),
            (self.vae_kl_weight >= 0, "vae_kl_weight must be >= 0"),
            (0 <= self.texture_fraction <= 1, "texture_fraction must be in [0, 1]"),
            (0 <= self.caption_dropout < 1, "caption_dropout must be in [0, 1)"),
        ])
        return self


def random_textures(n: int, size: int, rng: torch.Generator) -> torch.Tensor:
    """(n, 3, size, size) smooth random colour fields in [-1, 1] (variety beyond glyphs)."""
    grid = int(torch.randint(2, 9, (1,), generator=rng))
    coarse = torch.rand(n, 3, grid, grid, generator=rng) * 2 - 1
    gray = torch.rand(n, 1, 1, 1, generator=rng) < 0.5
    coarse = torch.where(gray, coarse.mean(1, keepdim=True).expand_as(coarse), coarse)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def train_vae(vae: torch.nn.Module, images: torch.Tensor, cfg: PretrainConfig, show_progress: bool,
              device: torch.device = torch.device("cpu")) -> list[float]:
    """Trains the autoencoder in place on `device` (draws on the CPU); returns the reconstruction-loss history."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_learning_rate)
    history = []
    with Progress(disable=not show_progress) as progress:
        bar = progress.add_task("pre-training VAE", total=cfg.vae_steps)
        for step in range(cfg.vae_steps):
            rng = generator(cfg.seed, "vae-step", step)
            if torch.rand(1, generator=rng).item() < cfg.texture_fraction:
                batch = random_textures(cfg.vae_batch_size, images.shape[-1], rng)
            else:
                batch = images[torch.randint(0, len(images), (cfg.vae_batch_size,), generator=rng)]
            batch = batch.to(device)
            posterior = vae.encode(batch).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=rng).to(device)
            recon = vae.decode(latents).sample
            rec = F.mse_loss(recon, batch) + F.l1_loss(recon, batch)
            loss = rec + cfg.vae_kl_weight * posterior.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(rec.item())
            progress.update(bar, advance=1)
    vae.eval().requires_grad_(False)
    return history


def pretrain(out_dir: Path, cfg: PretrainConfig = PretrainConfig(), show_progress: bool = True,
             device: torch.device = torch.device("cpu")) -> dict:
    """Builds and trains the tiny base on `device`; saves it with `save_pretrained`, its recipe and hashes.

    Every weight is trained, so it runs in fp32 (`--precision` is about frozen weights); random
    draws are made on the CPU, so the recipe gives the same base on any device up to kernel rounding.

    Returns:
        A summary with the final VAE reconstruction loss, the UNet loss and the scaling factor.

    Raises:
        ConfigError: an invalid recipe.
    """
    cfg.validate()
    seed_everything(cfg.seed)
    model_cfg = TinySDConfig()
    pipe = build_tiny_pipeline(model_cfg, seed=cfg.seed)
    run_on(pipe, device, torch.float32)
    glyphs = load_glyphs(model_cfg.image_size, cfg.num_glyphs, seed=cfg.seed)
    images = glyphs.images_tensor()
    vae_history = train_vae(pipe.vae, images, cfg, show_progress, device)
    # Unit-variance latents, as Stable Diffusion's 0.18215 does for its VAE.
    pipe.vae.register_to_config(scaling_factor=1.0)
    std = encode_images(pipe, images[:2048]).std().item()
    pipe.vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    task = build_task(pipe, glyphs)
    run_cfg = RunConfig(train=TrainConfig(method="full", steps=cfg.unet_steps, batch_size=cfg.unet_batch_size,
                                          learning_rate=cfg.unet_learning_rate,
                                          caption_dropout=cfg.caption_dropout, checkpoint_every=cfg.unet_steps,
                                          log_every=50, seed=cfg.seed))
    work = Path(out_dir).with_name(Path(out_dir).name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    result = train(task, FullUNet(run_cfg), work, show_progress=show_progress,
                   description="pre-training UNet")
    pipe.unet.eval().requires_grad_(False)
    staging = Path(out_dir).with_name(Path(out_dir).name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(str(staging), safe_serialization=True)
    recipe = {"recipe": cfg.to_dict(), "model": asdict(model_cfg),
              "data": f"glyphs (privdiff.data.builtin.load_glyphs, n={cfg.num_glyphs}, seed={cfg.seed})",
              "reproduce": "privdiff pretrain --out DIR (defaults are this recipe)"}
    atomic_write_text(staging / "RECIPE.yaml", yaml.safe_dump(recipe, sort_keys=False))
    write_checksums(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    shutil.rmtree(work, ignore_errors=True)
    return {"vae_reconstruction_loss": float(np.mean(vae_history[-50:])),
            "unet_loss": result.history[-1]["loss_avg"], "scaling_factor": pipe.vae.config.scaling_factor,
            "wall_time_s": result.wall_time_s, "mean_vae_loss_first_50": float(np.mean(vae_history[:50])),
            "latent_std_before_scaling": std, "steps": cfg.unet_steps}
