"""LoRA adapters on the UNet (and optionally the text encoder, via peft), in the diffusers LoRA format.

The file written is exactly what `pipe.load_lora_weights` reads: `unet.`- (and `text_encoder.`-)
prefixed peft keys in diffusers naming, plus each adapter's config (rank, alpha, targets) in the
header so alpha survives the round trip. Nothing else goes in the header unless a method adds it
explicitly (DP runs add `privdiff.dp.*`): no captions, paths, counts or seeds (docs/design/README.md,
convention 5).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel

from privdiff.config import LoRAConfig
from privdiff.errors import ModelError
from privdiff.models.inspect import read_header
from privdiff.runs.files import atomic_replace
from privdiff.runs.folder import LORA_WEIGHT_NAME

ADAPTER_METADATA_KEY = "lora_adapter_metadata"
ALLOWED_HEADER_KEYS = ("format", ADAPTER_METADATA_KEY)


def peft_config(cfg: LoRAConfig) -> LoraConfig:
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                      lora_dropout=cfg.dropout, init_lora_weights="gaussian")


def add_lora(model: UNet2DConditionModel | PreTrainedModel, cfg: LoRAConfig) -> list[torch.nn.Parameter]:
    """Freezes `model` (a UNet or a text encoder), attaches a LoRA adapter, returns its parameters in a fixed order.

    The model must already be on its final device (peft creates the adapter weights there).

    Raises:
        ModelError: none of the target modules exist in the model.
    """
    model.requires_grad_(False)
    try:
        model.add_adapter(peft_config(cfg))
    except ValueError as err:
        raise ModelError(f"cannot add LoRA to the {_kind(model)}: {str(err).splitlines()[0]}") from None
    cast_training_params(model, torch.float32)  # fp32 adapters on a low-precision base, same Parameter objects
    params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
    if not params:
        raise ModelError(f"no LoRA parameters created for target modules {cfg.target_modules}")
    return params


def _kind(model: torch.nn.Module) -> str:
    return "UNet" if isinstance(model, UNet2DConditionModel) else "text encoder"


def lora_state_dict(model: UNet2DConditionModel | PreTrainedModel) -> dict[str, torch.Tensor]:
    """The adapter weights in diffusers naming (without the `unet.` / `text_encoder.` prefix)."""
    state = get_peft_model_state_dict(model)
    return {k: v.detach().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}


def adapter_metadata(cfg: LoRAConfig) -> dict:
    """One adapter's config as `save_lora_weights` stores it in the header (per model prefix)."""
    return {"r": cfg.rank, "lora_alpha": cfg.alpha, "target_modules": sorted(cfg.target_modules),
            "lora_dropout": 0.0, "init_lora_weights": "gaussian", "use_dora": False}


def save_lora(path: Path, unet: UNet2DConditionModel, cfg: LoRAConfig,
              extra_metadata: dict[str, str] | None = None, *,
              text_encoder: PreTrainedModel | None = None, text_encoder_cfg: LoRAConfig | None = None) -> None:
    """Writes the adapter to `path` atomically, in the diffusers LoRA format.

    Args:
        path: destination `.safetensors` file.
        unet: the UNet carrying the adapter.
        cfg: the adapter's configuration (its rank/alpha/targets go into the header).
        extra_metadata: further header fields (string values), e.g. `privdiff.dp.epsilon`.
        text_encoder: a text encoder carrying its own adapter, written under `text_encoder.` (optional).
        text_encoder_cfg: that adapter's configuration (required with `text_encoder`).
    """
    if (text_encoder is None) != (text_encoder_cfg is None):
        raise ValueError("a text-encoder adapter needs both the text encoder and its LoRA config")
    text_encoder_parts = {}
    if text_encoder is not None:
        text_encoder_parts = {"text_encoder_lora_layers": lora_state_dict(text_encoder),
                              "text_encoder_lora_adapter_metadata": adapter_metadata(text_encoder_cfg)}
    with tempfile.TemporaryDirectory() as tmp:
        # Let diffusers choose key names and header layout, so the file is what it expects to read.
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=lora_state_dict(unet), unet_lora_adapter_metadata=adapter_metadata(cfg),
            **text_encoder_parts)
        tensors, metadata = read_lora(Path(tmp) / LORA_WEIGHT_NAME)
    metadata.update(extra_metadata or {})
    atomic_replace(path, lambda tmp_path: save_file(tensors, str(tmp_path), metadata=metadata))


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reads a LoRA safetensors file: (tensors, header metadata).

    Raises:
        ModelError: missing or unreadable file.
    """
    if not Path(path).is_file():
        raise ModelError(f"LoRA file not found: {path}")
    read_header(path)  # strict header checks first: safetensors itself never sees a hostile header
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ModelError(f"{path}: not a readable safetensors file ({type(err).__name__})") from None
    return tensors, metadata


def load_lora_into_unet(unet: UNet2DConditionModel, path: Path, cfg: LoRAConfig | None = None) -> None:
    """Attaches the UNet adapter of a file saved by `save_lora` to a bare UNet (for sampling and attacks).

    Raises:
        ModelError: the file's keys or shapes do not match this UNet.
    """
    tensors, metadata = read_lora(path)
    if cfg is None:
        ranks = [t.shape[0] for k, t in tensors.items()
                 if k.startswith("unet.") and ("lora_A" in k or "lora.down" in k)]
        if not ranks:
            raise ModelError(f"{path}: no LoRA tensors found")
        cfg = header_config(path, metadata, "unet", ranks[0], ["to_q", "to_k", "to_v", "to_out.0"])
    state = convert_unet_state_dict_to_peft(
        {k.removeprefix("unet."): v for k, v in tensors.items() if k.startswith("unet.")})
    _attach(unet, cfg, state, path)


def load_lora_into_text_encoder(text_encoder: PreTrainedModel, path: Path) -> bool:
    """Attaches the file's text-encoder adapter (`text_encoder.` keys), if it has one; returns whether it did.

    Raises:
        ModelError: the file's text-encoder keys or shapes do not match this text encoder.
    """
    tensors, metadata = read_lora(path)
    own = {k.removeprefix("text_encoder."): v for k, v in tensors.items() if k.startswith("text_encoder.")}
    if not own:
        return False
    ranks = [t.shape[0] for k, t in own.items() if "lora_A" in k or "down" in k]
    if not ranks:
        raise ModelError(f"{path}: text-encoder tensors but no LoRA down (A) matrix among them")
    cfg = header_config(path, metadata, "text_encoder", ranks[0], ["q_proj", "k_proj", "v_proj", "out_proj"])
    _attach(text_encoder, cfg, convert_state_dict_to_peft(own), path)
    return True


def header_config(path: Path, metadata: dict[str, str], prefix: str, rank: int,
                  targets: list[str] | None = None) -> LoRAConfig:
    """The `prefix` ("unet", "text_encoder") adapter's config from the header; what it lacks defaults to
    `rank`, alpha = rank (diffusers' convention) and `targets`.

    Raises:
        ModelError: the header's adapter config is not a JSON object.
    """
    try:
        meta = json.loads(metadata.get(ADAPTER_METADATA_KEY, "{}"))
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: the LoRA adapter config is not a JSON object")
    rank_, alpha = meta.get(f"{prefix}.r", rank), meta.get(f"{prefix}.lora_alpha", rank)
    modules = meta.get(f"{prefix}.target_modules", targets or [])
    valid = (isinstance(rank_, (int, float)) and not isinstance(rank_, bool) and float(rank_).is_integer()
             and 1 <= rank_ <= 1 << 16 and isinstance(alpha, (int, float))
             and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0
             and isinstance(modules, list) and all(isinstance(m, str) for m in modules))
    if not valid:
        raise ModelError(f"{path}: the LoRA adapter config has an invalid rank, alpha or target list "
                         f"(r={str(rank_)[:20]}, alpha={str(alpha)[:20]})")
    return LoRAConfig(rank=int(rank_), alpha=float(alpha), target_modules=list(modules))


def _attach(model: torch.nn.Module, cfg: LoRAConfig, state: dict[str, torch.Tensor], path: Path) -> None:
    kind = _kind(model)
    add_lora(model, cfg)
    try:
        result = set_peft_model_state_dict(model, state)
    except RuntimeError as err:
        raise ModelError(f"{path}: adapter does not match this {kind} ({str(err).splitlines()[0]})") from None
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelError(f"{path}: adapter does not match this {kind} (unexpected key {unexpected[0]})")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ModelError(f"{path}: adapter does not match this {kind} (missing key {missing[0]})")
