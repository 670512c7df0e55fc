"""Full-size Stable Diffusion architectures (SD-1.5, SDXL base 1.0) with random, seeded weights, built offline.

The shipped configs (`assets/architectures/<name>/<component>/config.json`) are the public ones; no
weights ship and nothing is downloaded. A model built here has the real shapes, so what it costs
(time, memory, adapter size) is what the real checkpoint costs; what it generates is noise. The
tokenizer is privdiff's code-built word-level CLIP tokenizer at CLIP's length (77 tokens).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from privdiff.errors import ConfigError
from privdiff.models.load import ASSETS_DIR
from privdiff.models.tokenizer import build_tokenizer
from privdiff.seeding import derive_seed

ARCHITECTURES_DIR = ASSETS_DIR / "architectures"
ARCHITECTURES = ("sd15", "sdxl")
TOKENIZER_LENGTH = 77  # CLIP's context length: the text encoders have 77 position embeddings
MODEL_CLASSES: dict[str, type[torch.nn.Module]] = {
    "unet": UNet2DConditionModel,
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModel,
    "text_encoder_2": CLIPTextModelWithProjection,
}


def architecture_components(name: str) -> tuple[str, ...]:
    """The model components `name` ships configs for, in pipeline order (the scheduler aside).

    Raises:
        ConfigError: `name` is not a shipped architecture.
    """
    _check_name(name)
    return tuple(c for c in MODEL_CLASSES if (ARCHITECTURES_DIR / name / c / "config.json").is_file())


def read_architecture_config(name: str, component: str) -> dict[str, Any]:
    """The shipped config.json of one component (`scheduler` reads its scheduler_config.json).

    Raises:
        ConfigError: unknown architecture, or a component it does not have.
    """
    _check_name(name)
    if component == "scheduler":
        return json.loads((ARCHITECTURES_DIR / name / "scheduler" / "scheduler_config.json").read_text())
    known = architecture_components(name)
    if component not in known:
        raise ConfigError(f"architecture '{name}' has no component '{component}' (choose from: {', '.join(known)})")
    return json.loads((ARCHITECTURES_DIR / name / component / "config.json").read_text())


def _check_name(name: str) -> None:
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture '{name}' (choose from: {', '.join(ARCHITECTURES)})")


def build_architecture_tokenizer() -> CLIPTokenizer:
    """privdiff's code-built CLIP tokenizer, padded to CLIP's 77 tokens (both SDXL tokenizers are this one)."""
    return build_tokenizer(max_length=TOKENIZER_LENGTH)


def build_component(name: str, component: str, *, seed: int = 0, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """One randomly initialised component of architecture `name`, frozen and in eval mode.

    The weights are drawn on the CPU from a seed derived from (seed, name, component), so they are the
    same whatever the device, the dtype (a cast of the float32 draw) or the order components are
    built in; `device="meta"` builds the shapes only (no memory, for counting parameters).

    Args:
        name: an entry of `ARCHITECTURES` ("sd15", "sdxl").
        component: "unet", "vae", "text_encoder" or (SDXL) "text_encoder_2".
        seed: weights seed.
        device: where the returned module lives.
        dtype: floating-point dtype of the returned module's parameters and buffers.

    Raises:
        ConfigError: unknown architecture or component.
    """
    config = read_architecture_config(name, component)
    model_class = MODEL_CLASSES[component]
    build_on = torch.device("meta") if torch.device(device).type == "meta" else torch.device("cpu")
    torch.manual_seed(derive_seed(seed, "architecture", name, component))
    with build_on:
        if component.startswith("text_encoder"):
            tokenizer = build_architecture_tokenizer()
            ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
            model = model_class(CLIPTextConfig.from_dict({**config, **ids}))
        else:
            model = model_class.from_config(config)
    model = model.to(device)
    if dtype != torch.float32:  # built in float32: `to(dtype)` would only warn
        model = model.to(dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def build_architecture_scheduler(name: str) -> DDPMScheduler:
    """The training noise schedule of `name` (DDPM, the public betas).

    Raises:
        ConfigError: unknown architecture.
    """
    return DDPMScheduler.from_config(read_architecture_config(name, "scheduler"))


def build_architecture_pipeline(name: str, *, seed: int = 0, device: str | torch.device = "cpu",
                                dtype: torch.dtype = torch.float32
                                ) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The whole text-to-image pipeline of `name` with random weights (`build_component` for each part).

    SD-1.5 gives a `StableDiffusionPipeline`, SDXL a `StableDiffusionXLPipeline` (no watermarker);
    no safety checker. Memory: about 4.3 GB (SD-1.5) or 13.9 GB (SDXL) in float32.

    Raises:
        ConfigError: unknown architecture.
    """
    parts = {c: build_component(name, c, seed=seed, device=device, dtype=dtype) for c in architecture_components(name)}
    scheduler = build_architecture_scheduler(name)
    if "text_encoder_2" in parts:
        pipe = StableDiffusionXLPipeline(**parts, tokenizer=build_architecture_tokenizer(),
                                         tokenizer_2=build_architecture_tokenizer(), scheduler=scheduler,
                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**parts, tokenizer=build_architecture_tokenizer(), scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["ARCHITECTURES", "ARCHITECTURES_DIR", "architecture_components", "build_architecture_pipeline",
           "build_architecture_scheduler", "build_architecture_tokenizer", "build_component",
           "read_architecture_config"]
