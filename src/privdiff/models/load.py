"""Loading Stable Diffusion (1.x/2.x and XL) pipelines from local folders only (nothing is ever downloaded)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from diffusers import (
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from privdiff.errors import ModelError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
BASE_MODEL_DIR = ASSETS_DIR / "tiny-sd-glyphs"  # the shipped base: glyphs (the demo's)
FACE_BASE_DIR = ASSETS_DIR / "tiny-sd-identities"  # the shipped face base (the weights attack's)
CHECKSUM_FILE = "SHA256SUMS"
VAE_PARTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")  # what vae.encode / vae.decode call

# The pipeline kinds privdiff loads, by model_index.json's `_class_name`, and what each is loaded
# without (Stable Diffusion's safety checker, SDXL's invisible watermark).
PIPELINE_KINDS: dict[str, tuple[type[DiffusionPipeline], dict]] = {
    "StableDiffusionPipeline": (StableDiffusionPipeline, {"safety_checker": None, "feature_extractor": None,
                                                          "requires_safety_checker": False}),
    "StableDiffusionXLPipeline": (StableDiffusionXLPipeline, {"add_watermarker": False}),
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksums(folder: Path) -> None:
    """Checks every file listed in `folder/SHA256SUMS` (sha256sum format).

    Raises:
        ModelError: a listed file is missing or its hash differs.
    """
    sums = folder / CHECKSUM_FILE
    if not sums.exists():
        return
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        path = folder / name.lstrip("*")
        if not path.exists():
            raise ModelError(f"{folder}: missing file {name} listed in {CHECKSUM_FILE}")
        if sha256_file(path) != digest:
            raise ModelError(f"{path}: sha256 does not match {CHECKSUM_FILE} (corrupt or modified)")


def write_checksums(folder: Path, suffixes: tuple[str, ...] = (".safetensors", ".json", ".txt")) -> None:
    """Writes `SHA256SUMS` over the weight and config files (`suffixes`) of a saved folder."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE
                   and p.suffix in suffixes)
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}" for p in files]
    (folder / CHECKSUM_FILE).write_text("\n".join(lines) + "\n")


def _quiet_hf_loading() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def fix_tokenizer_length(tokenizer, text_encoder) -> None:
    """A tokenizer saved without `model_max_length` reads back as 1e30 (transformers' sentinel),
    which overflows when padding; fall back to the text encoder's position embeddings.

    Raises:
        ModelError: neither the tokenizer nor the text encoder states a usable length.
    """
    positions = getattr(text_encoder.config, "max_position_embeddings", None)
    length = tokenizer.model_max_length
    if isinstance(length, int) and 0 < length <= (positions or 1 << 20):
        return
    if not (isinstance(positions, int) and positions > 0):
        raise ModelError(f"the tokenizer states no usable model_max_length ({length!r}) and the text encoder "
                         f"no max_position_embeddings: set model_max_length in tokenizer_config.json")
    tokenizer.model_max_length = positions


def _place(value, device: torch.device, dtype: torch.dtype):
    if torch.is_tensor(value):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, dict):
        return {k: _place(v, device, dtype) for k, v in value.items()}
    return value


def place_inputs(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Moves the tensor inputs of `module`'s forward to its device, floating ones in its `dtype`.

    Data, noise and timesteps live on the CPU in fp32 (drawn there, so that one config draws the
    same numbers on every device); only the frozen models run on the device, in low precision if
    asked. Their outputs stay where they were computed: the losses come back to the CPU in fp32
    (`diffusion.loss.squared_error`).
    """
    def hook(_module, args, kwargs):
        return tuple(_place(a, device, dtype) for a in args), {k: _place(v, device, dtype) for k, v in kwargs.items()}

    module.register_forward_pre_hook(hook, with_kwargs=True)


def run_on(pipe, device: torch.device, dtype: torch.dtype) -> None:
    """Moves the pipeline's models to `device` in `dtype`, inputs following (`place_inputs`); a
    no-op on the CPU in fp32."""
    if device == torch.device("cpu") and dtype == torch.float32:
        return
    if pipe.unet.dtype != dtype:  # a pipeline loaded by `load_pipeline` is in its dtype already
        pipe.to(dtype=dtype)
    if device != torch.device("cpu"):
        pipe.to(device)
    text_encoders = (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))  # SDXL has two
    for module in (pipe.unet, *text_encoders, *(getattr(pipe.vae, part, None) for part in VAE_PARTS)):
        if module is not None:
            place_inputs(module, device, dtype)


def pipeline_kind(folder: Path) -> tuple[type[DiffusionPipeline], dict]:
    """The pipeline class of a folder (model_index.json's `_class_name`) and its loading arguments.

    Raises:
        ModelError: model_index.json is unreadable, or names a kind privdiff does not support.
    """
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"cannot load pipeline from {folder}: model_index.json is not valid JSON") from None
    kind = index.get("_class_name") if isinstance(index, dict) else None
    if not (isinstance(kind, str) and kind in PIPELINE_KINDS):
        raise ModelError(f"{folder}: unsupported pipeline kind {str(kind)[:60]!r} in model_index.json "
                         f"(supported: {', '.join(PIPELINE_KINDS)})")
    return PIPELINE_KINDS[kind]


def load_pipeline(path: str | Path | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """Loads a Stable Diffusion 1.x/2.x or SDXL pipeline (diffusers layout) from a local folder onto
    `device`, its weights in `dtype` (frozen; LoRA adapters added later are kept in fp32 by
    `models.lora.add_lora`).

    The model is on its device and in its dtype before any adapter is added (dp-lora.md §11.1). An
    SDXL folder's scheduler is replaced by the DDPM one of the same config: its usual
    EulerDiscreteScheduler adds noise σ-parameterised, and training, DP and the attacks need
    x_t = √ᾱ_t·z0 + √(1 − ᾱ_t)·n (diffusers' SDXL training script does the same); sampling picks its
    own sampler anyway.

    Args:
        path: folder saved by `save_pretrained` (model_index.json, unet/, vae/, text_encoder/,
            tokenizer/, scheduler/; SDXL adds text_encoder_2/, tokenizer_2/); None loads the shipped
            tiny base model after checking its hashes.

    Raises:
        ModelError: the folder is missing, not in the diffusers layout, of an unsupported kind
            (e.g. StableDiffusion3Pipeline, FluxPipeline), or fails to load.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(path) if path is not None else BASE_MODEL_DIR
    if not folder.is_dir():
        raise ModelError(f"pretrained model folder not found: {folder}")
    if not (folder / "model_index.json").exists():
        raise ModelError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    pipeline_class, without = pipeline_kind(folder)
    verify_checksums(folder)
    _quiet_hf_loading()
    try:
        pipe = pipeline_class.from_pretrained(str(folder), local_files_only=True, dtype=dtype, **without)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load pipeline from {folder}: {first}") from None
    pipe.set_progress_bar_config(disable=True)
    encoders = [(pipe.tokenizer, pipe.text_encoder)]
    if isinstance(pipe, StableDiffusionXLPipeline):
        encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for tokenizer, text_encoder in encoders:
        fix_tokenizer_length(tokenizer, text_encoder)
    run_on(pipe, torch.device(device), dtype)
    for module in (pipe.unet, pipe.vae, *(encoder for _, encoder in encoders)):
        module.requires_grad_(False)
        module.eval()
    return pipe


def require_stable_diffusion(pipe: DiffusionPipeline, purpose: str) -> None:
    """Refuses an SDXL base where only Stable Diffusion 1.x/2.x is supported.

    Raises:
        ModelError: `pipe` is not a StableDiffusionPipeline.
    """
    if not isinstance(pipe, StableDiffusionPipeline):
        raise ModelError(f"{purpose} supports StableDiffusionPipeline bases only, not {type(pipe).__name__}")
