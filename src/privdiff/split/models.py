"""The public frozen components both roles load, the server's ControlNet, and the module swaps that
let one diffusers model run from a received tensor (split-controlnet.md §6, implementation hints)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from privdiff.errors import ModelError
from privdiff.models.load import load_pipeline, require_stable_diffusion
from privdiff.split.activation import protect

SPLIT_META_NAME = "privdiff_split.json"


@dataclass
class PublicModels:
    """Everything public and frozen: autoencoder, text encoder and tokenizer, base UNet, scheduler."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    unet: UNet2DConditionModel
    scheduler: object

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        side = image_size // self.vae_factor
        return (int(self.unet.config.in_channels), side, side)

    @property
    def stem_channels(self) -> int:
        return int(self.unet.conv_in.out_channels)

    @property
    def text_shape(self) -> tuple[int, int]:
        return (int(self.tokenizer.model_max_length), int(self.unet.config.cross_attention_dim))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)


def load_public_models(pretrained: str | None) -> PublicModels:
    """The frozen components of a local Stable Diffusion folder (None: the shipped tiny base)."""
    pipe = load_pipeline(pretrained)
    require_stable_diffusion(pipe, "split learning")
    return PublicModels(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                        unet=pipe.unet, scheduler=pipe.scheduler)


def build_split_controlnet(unet: UNet2DConditionModel, vae_factor: int, seed: int) -> ControlNetModel:
    """The ControlNet copy of `unet` whose hint block downsamples by the autoencoder's factor.

    The hint block downsamples 2^(len(channels) − 1), so it needs log2(f) + 1 entries (split-controlnet.md §4:
    (16, 32, 96) for f4; the default 4-entry block is f8 and fails on f4 latents). Seeded, so the
    vanilla client and the server build bit-identical initial weights.
    """
    depth = int(math.log2(vae_factor)) + 1
    channels = (16, 32, 96, 256, 256)[:depth]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    return controlnet


class ZeroHint(torch.nn.Module):
    """Stands in for the hint block: the ControlNet adds nothing to its conv_in output."""

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=conditioning.dtype, device=conditioning.device)


@contextmanager
def replaced(module: torch.nn.Module, name: str, stand_in: torch.nn.Module) -> Iterator[None]:
    """Temporarily swaps the child `name` of `module` (e.g. conv_in -> Identity)."""
    original = getattr(module, name)
    setattr(module, name, stand_in)
    try:
        yield
    finally:
        setattr(module, name, original)


def controlnet_residuals(controlnet: ControlNetModel, sample: torch.Tensor, timesteps: torch.Tensor,
                         context: torch.Tensor, *, skip_conv_in: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The ControlNet's residuals with its hint block switched off.

    Args:
        sample: backward-free: h (B, C, h, w) through the ControlNet's own conv_in;
            vanilla: the client's `control` (B, C0, h, w), which already went through conv_in and the
            hint block on the client (`skip_conv_in=True`).
    """
    stand_in = torch.nn.Identity() if skip_conv_in else controlnet.conv_in
    with replaced(controlnet, "controlnet_cond_embedding", ZeroHint()), replaced(controlnet, "conv_in", stand_in):
        down, mid = controlnet(sample, timesteps, encoder_hidden_states=context,
                               controlnet_cond=sample, return_dict=False)
    return list(down), mid


def unet_from_stem(unet: UNet2DConditionModel, s0: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                   down: list[torch.Tensor], mid: torch.Tensor) -> torch.Tensor:
    """ε̂ of the frozen UNet started from s0 = conv_in(x_t) (received), with ControlNet residuals."""
    with replaced(unet, "conv_in", torch.nn.Identity()):
        return unet(s0, timesteps, encoder_hidden_states=context, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample


class BackwardFreeControlNet(ControlNetModel):
    """A trained backward-free ControlNet, shaped for `StableDiffusionControlNetPipeline` (split-controlnet.md §8.5).

    Its forward takes what the pipeline passes (x_t, the condition image c in [0, 1], the prompt
    embeddings) and does what the client and server did in training: h = precision(activation(
    E(2c − 1)·scale + x_t)), zero text context, the trained ControlNet on h with no hint block.
    The autoencoder is bound after loading (`bind`), not stored in the ControlNet's weights. The
    condition latent is the posterior mean here (training used posterior samples).
    """

    def bind(self, vae: torch.nn.Module, activation: str, precision: str) -> "BackwardFreeControlNet":
        object.__setattr__(self, "_split_vae", vae)  # not a submodule: never saved with the ControlNet
        object.__setattr__(self, "_split_activation", (activation, precision))
        return self

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: float = 1.0, **kwargs):
        vae = getattr(self, "_split_vae", None)
        if vae is None:
            raise ModelError("BackwardFreeControlNet needs bind(vae, activation, precision) before use")
        activation, precision = self._split_activation
        condition = controlnet_cond.to(device=sample.device, dtype=vae.dtype)
        z_c = vae.encode(2 * condition - 1).latent_dist.mode() * vae.config.scaling_factor
        h = protect(z_c, sample, activation, precision).to(sample.dtype)
        with replaced(self, "controlnet_cond_embedding", ZeroHint()):
            return super().forward(h, timestep, torch.zeros_like(encoder_hidden_states), h,
                                   conditioning_scale=conditioning_scale, **kwargs)


def save_split_controlnet(controlnet: ControlNetModel, folder: Path, protocol: dict) -> None:
    """`save_pretrained` plus the protocol settings inference needs (activation, precision, design)."""
    folder.mkdir(parents=True, exist_ok=True)
    controlnet.save_pretrained(str(folder), safe_serialization=True)
    (folder / SPLIT_META_NAME).write_text(json.dumps(protocol, indent=2) + "\n")


def load_split_controlnet(folder: str | Path, vae: torch.nn.Module) -> ControlNetModel:
    """A saved split ControlNet, ready for `StableDiffusionControlNetPipeline(controlnet=...)`."""
    folder = Path(folder)
    meta_path = folder / SPLIT_META_NAME
    if not meta_path.is_file():
        raise ModelError(f"{folder}: not a privdiff split ControlNet (no {SPLIT_META_NAME})")
    meta = json.loads(meta_path.read_text())
    try:
        if meta["design"] == "backward-free":
            model = BackwardFreeControlNet.from_pretrained(str(folder), local_files_only=True)
            return model.bind(vae, meta["activation"], meta["precision"]).eval()
        return ControlNetModel.from_pretrained(str(folder), local_files_only=True).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"cannot load the ControlNet in {folder}: {str(err).splitlines()[0]}") from None


__all__ = ["BackwardFreeControlNet", "PublicModels", "ZeroHint", "build_split_controlnet", "controlnet_residuals",
           "load_public_models", "load_split_controlnet", "replaced", "save_split_controlnet", "unet_from_stem"]
