"""Sampling images from a (LoRA-adapted) pipeline, and saving them as a PNG grid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline
from PIL import Image

from privdiff.config import SampleConfig
from privdiff.errors import ConfigError, ModelError
from privdiff.models.load import load_pipeline
from privdiff.models.lora import (
    LORA_WEIGHT_NAME,
    load_lora_into_text_encoder,
    load_lora_into_unet,
)
from privdiff.runs.files import atomic_replace
from privdiff.seeding import generator

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def default_prompts(captions: list[str], num_images: int) -> list[str]:
    """The distinct captions of a dataset, sorted and cycled to `num_images` prompts."""
    unique = sorted(set(captions))
    return [unique[i % len(unique)] for i in range(num_images)]


@torch.no_grad()
def sample_images(pipe: DiffusionPipeline, prompts: list[str], cfg: SampleConfig,
                  image_size: int) -> np.ndarray:
    """Generates one image per prompt with the configured sampler and guidance.

    Returns:
        (N, H, W, 3) uint8 images. The same `cfg.seed` gives the same images.
    """
    original = pipe.scheduler
    pipe.scheduler = SCHEDULERS[cfg.scheduler].from_config(original.config)
    pipe.unet.eval()
    try:
        out = pipe(prompts, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                   generator=torch.Generator().manual_seed(cfg.seed), height=image_size, width=image_size,
                   output_type="np")
    finally:
        pipe.scheduler = original
    return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)


@torch.no_grad()
def sample_seeded(pipe: DiffusionPipeline, prompts: list[str], *, seed: int, num_inference_steps: int,
                  scheduler: str, guidance_scale: float, image_size: int, batch_size: int = 125,
                  description: str = "generating samples", show_progress: bool = True) -> np.ndarray:
    """One image per prompt; image i starts from the latent of stream (seed, "sample", i).

    Each image depends on its index only, not on the batching, so every model evaluated with the
    same seed starts from identical latents (paired comparisons).

    Returns:
        (N, H, W, 3) uint8 images.
    """
    from rich.progress import Progress

    original = pipe.scheduler
    pipe.scheduler = SCHEDULERS[scheduler].from_config(original.config)
    pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)
    chunks = []
    try:
        with Progress(disable=not show_progress, transient=True) as progress:
            bar = progress.add_task(description, total=len(prompts))
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start:start + batch_size]
                generators = [generator(seed, "sample", start + i) for i in range(len(batch))]
                out = pipe(batch, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           generator=generators, height=image_size, width=image_size, output_type="np")
                chunks.append((np.clip(out.images, 0, 1) * 255).round().astype(np.uint8))
                progress.advance(bar, len(batch))
    finally:
        pipe.scheduler = original
    return np.concatenate(chunks)


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> Image.Image:
    """(N, H, W, 3) uint8 -> one grid image with `pad` pixels of white between tiles."""
    n, h, w, _ = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    return Image.fromarray(grid)


def save_grid(images: np.ndarray, path: Path, scale: int = 2) -> None:
    """Saves the grid atomically, upscaled `scale` times (nearest) so tiny images stay visible."""
    grid = image_grid(images)
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    atomic_replace(Path(path), lambda tmp: grid.save(tmp, format="PNG"))


def sample_to_file(*, run_dir: Path | None, lora: Path | None, pretrained: str | None,
                   prompts: list[str] | None, num_images: int, steps: int, scheduler: str,
                   guidance_scale: float, seed: int, out: Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> Path:
    """Loads the base (+ adapter from `lora` or `run_dir`) and writes a sample grid to `out`.

    Raises:
        ConfigError: conflicting or missing inputs; ModelError: base or adapter cannot be loaded.
    """
    import json

    import yaml

    if scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler '{scheduler}' (choose ddim or ddpm)")
    if run_dir is not None and lora is not None:
        raise ConfigError("give a run folder or --lora, not both")
    image_size = 32
    if run_dir is not None:
        summary_path = Path(run_dir) / "summary.json"
        if not summary_path.exists():
            raise ConfigError(f"{run_dir} is not a finished run folder (no summary.json)")
        config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
        summary = json.loads(summary_path.read_text())
        pretrained = pretrained or config["model"]["pretrained"]
        image_size = config["data"]["image_size"]
        prompts = prompts or summary.get("sample_prompts")
        lora = Path(run_dir) / LORA_WEIGHT_NAME
    if lora is not None and not Path(lora).is_file():
        raise ModelError(f"LoRA file not found: {lora}")
    if not prompts:
        raise ConfigError("no prompts: pass --prompt (or a run folder, whose captions are used)")
    pipe = load_pipeline(pretrained, device=device, dtype=dtype)
    if run_dir is None:
        image_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if lora is not None:
        load_lora_into_unet(pipe.unet, Path(lora))
        load_lora_into_text_encoder(pipe.text_encoder, Path(lora))  # a no-op for UNet-only files
    cfg = SampleConfig(num_images=num_images, num_inference_steps=steps, scheduler=scheduler,
                       guidance_scale=guidance_scale, seed=seed)
    images = sample_images(pipe, [prompts[i % len(prompts)] for i in range(num_images)], cfg, image_size)
    save_grid(images, out)
    return Path(out)
