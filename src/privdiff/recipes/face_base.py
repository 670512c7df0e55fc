"""The public face base model of the weights attack (weights-attack.md §4): `tiny-sd-identities`.

It starts from the shipped glyph base (`tiny-sd-glyphs`) and keeps its tokenizer, text encoder
and scheduler. The glyph VAE blurs the faces beyond recognition, so it is first fine-tuned briefly
on the base pool (and its latent scaling factor re-measured); then every UNet weight is trained on
the base pool (300 identities x 20 renders, caption "a face") through the shared loop, with caption
dropout for classifier-free guidance. Victims, shadows and the identity embedder never see a base
identity.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers import StableDiffusionPipeline

from privdiff.config import RunConfig, TrainConfig
from privdiff.data.examples import to_model_tensor
from privdiff.data.identities import identity_images, load_identities, pool_identities
from privdiff.diffusion.task import build_task, encode_images
from privdiff.models.load import (
    BASE_MODEL_DIR,
    FACE_BASE_DIR,
    load_pipeline,
    sha256_file,
    write_checksums,
)
from privdiff.recipes.glyph_base import PretrainConfig, train_vae
from privdiff.runs.files import atomic_write_text
from privdiff.seeding import seed_everything
from privdiff.training.loop import train
from privdiff.training.methods.lora import FullUNet


@dataclass(frozen=True)
class FaceBaseRecipe:
    """The recipe of the shipped face base (`assets/tiny-sd-identities/RECIPE.yaml`)."""

    seed: int = 0
    vae_steps: int = 1_200         # 0 keeps the glyph VAE unchanged
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_texture_fraction: float = 0.1  # share of VAE batches that are smooth random textures
    unet_steps: int = 2_000
    unet_batch_size: int = 32
    unet_learning_rate: float = 5e-4
    caption_dropout: float = 0.1


def face_reconstruction_mse(pipe: StableDiffusionPipeline, identities: int = 128, renders: int = 2) -> float:
    """VAE round-trip MSE (images in [0, 1], posterior mean) on renders of `embedding`-pool
    identities, which no base model ever trains on."""
    images = to_model_tensor(np.concatenate([identity_images(i, renders) for i in pool_identities("embedding")
                                             [:identities]]))
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    return float(((recon - images) / 2).pow(2).mean())


def build_face_base(out_dir: Path = FACE_BASE_DIR, recipe: FaceBaseRecipe = FaceBaseRecipe(),
                    show_progress: bool = True) -> dict:
    """Fine-tunes the glyph base into the face base; saves it with `save_pretrained`, its recipe
    and hashes (written to a staging folder, then renamed into place).

    Returns:
        The summary recorded in RECIPE.yaml (losses, VAE reconstruction error, wall times).
    """
    seed_everything(recipe.seed)
    pipe = load_pipeline()
    data = load_identities(32, None, recipe.seed)  # all 300 x 20 base-pool renders
    images = data.images_tensor()
    summary: dict = {"vae_reconstruction_mse_glyph_vae": face_reconstruction_mse(pipe)}
    began = time.perf_counter()
    if recipe.vae_steps:
        vae_cfg = PretrainConfig(seed=recipe.seed, vae_steps=recipe.vae_steps, vae_batch_size=recipe.vae_batch_size,
                                 vae_learning_rate=recipe.vae_learning_rate, vae_kl_weight=recipe.vae_kl_weight,
                                 texture_fraction=recipe.vae_texture_fraction)
        history = train_vae(pipe.vae, images, vae_cfg, show_progress)
        # Unit-variance latents again, as in pre-training (the UNet is re-trained on them anyway).
        pipe.vae.register_to_config(scaling_factor=1.0)
        std = encode_images(pipe, images[:2048]).std().item()
        pipe.vae.register_to_config(scaling_factor=round(1.0 / std, 5))
        summary["vae_train_loss_last_50"] = float(np.mean(history[-50:]))
    summary["vae_reconstruction_mse"] = face_reconstruction_mse(pipe)
    summary["vae_wall_time_s"] = time.perf_counter() - began
    summary["scaling_factor"] = pipe.vae.config.scaling_factor
    task = build_task(pipe, data)
    run_cfg = RunConfig(train=TrainConfig(method="full", steps=recipe.unet_steps, batch_size=recipe.unet_batch_size,
                                          learning_rate=recipe.unet_learning_rate,
                                          caption_dropout=recipe.caption_dropout, checkpoint_every=recipe.unet_steps,
                                          log_every=50, seed=recipe.seed))
    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    result = train(task, FullUNet(run_cfg), work, show_progress=show_progress, description="training face UNet")
    pipe.unet.eval().requires_grad_(False)
    summary.update({"unet_loss": result.history[-1]["loss_avg"], "unet_loss_first_50": result.history[0]["loss_avg"],
                    "unet_wall_time_s": result.wall_time_s, "torch": str(torch.__version__)})
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(str(staging), safe_serialization=True)
    # The tokenizer is kept byte for byte (saving it again would record the loader's options).
    shutil.copytree(BASE_MODEL_DIR / "tokenizer", staging / "tokenizer", dirs_exist_ok=True)
    record = {"recipe": asdict(recipe),
              "start": f"tiny-sd-glyphs (unet sha256 "
                       f"{sha256_file(BASE_MODEL_DIR / 'unet' / 'diffusion_pytorch_model.safetensors')[:16]}); "
                       f"tokenizer, text encoder and scheduler kept",
              "data": f"identities base pool ({len(data)} renders: privdiff.data.identities.load_identities, "
                      f"caption 'a face')",
              "results": summary,
              "reproduce": "privdiff.recipes.face_base.build_face_base() (defaults are this recipe)"}
    atomic_write_text(staging / "RECIPE.yaml", yaml.safe_dump(record, sort_keys=False))
    write_checksums(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    shutil.rmtree(work, ignore_errors=True)
    return summary
