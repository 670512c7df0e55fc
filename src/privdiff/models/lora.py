"""LoRA adapters on the UNet (peft), exported in the diffusers LoRA format.

The file written is exactly what `pipe.load_lora_weights` reads: `unet.`-prefixed peft keys in
diffusers naming, plus the adapter config (rank, alpha, targets) in the header so alpha survives
the round trip. Nothing else goes in the header unless a method adds it explicitly (DP runs add
`privdiff.dp.*`): no captions, paths, counts or seeds (specs/README.md, convention 5).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from privdiff.config import LoRAConfig
from privdiff.errors import ModelError
from privdiff.training.checkpoint import atomic_replace

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
ALLOWED_HEADER_KEYS = ("format", ADAPTER_METADATA_KEY)


def peft_config(cfg: LoRAConfig) -> LoraConfig:
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                      lora_dropout=cfg.dropout, init_lora_weights="gaussian")


def add_lora(unet: UNet2DConditionModel, cfg: LoRAConfig) -> list[torch.nn.Parameter]:
    """Freezes `unet`, attaches a LoRA adapter, returns the adapter parameters (in a fixed order).

    The model must already be on its final device (peft creates the adapter weights there).

    Raises:
        ModelError: none of the target modules exist in the UNet.
    """
    unet.requires_grad_(False)
    try:
        unet.add_adapter(peft_config(cfg))
    except ValueError as err:
        raise ModelError(f"cannot add LoRA to the UNet: {str(err).splitlines()[0]}") from None
    cast_training_params(unet, torch.float32)  # fp32 adapters on a low-precision base, same Parameter objects
    params = [p for _, p in sorted(unet.named_parameters()) if p.requires_grad]
    if not params:
        raise ModelError(f"no LoRA parameters created for target modules {cfg.target_modules}")
    return params


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The adapter weights in diffusers naming (without the `unet.` prefix)."""
    state = get_peft_model_state_dict(unet)
    return {k: v.detach().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}


def save_lora(path: Path, unet: UNet2DConditionModel, cfg: LoRAConfig,
              extra_metadata: dict[str, str] | None = None) -> None:
    """Writes the adapter to `path` atomically, in the diffusers LoRA format.

    Args:
        path: destination `.safetensors` file.
        unet: the UNet carrying the adapter.
        cfg: the adapter's configuration (its rank/alpha/targets go into the header).
        extra_metadata: further header fields (string values), e.g. `privdiff.dp.epsilon`.
    """
    adapter_meta = {"r": cfg.rank, "lora_alpha": cfg.alpha, "target_modules": sorted(cfg.target_modules),
                    "lora_dropout": 0.0, "init_lora_weights": "gaussian", "use_dora": False}
    with tempfile.TemporaryDirectory() as tmp:
        # Let diffusers choose key names and header layout, so the file is what it expects to read.
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=lora_state_dict(unet), unet_lora_adapter_metadata=adapter_meta)
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
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ModelError(f"{path}: not a readable safetensors file ({type(err).__name__})") from None
    return tensors, metadata


def load_lora_into_unet(unet: UNet2DConditionModel, path: Path, cfg: LoRAConfig | None = None) -> None:
    """Attaches an adapter saved by `save_lora` to a bare UNet (for resumed sampling and attacks).

    Raises:
        ModelError: the file's keys or shapes do not match this UNet.
    """
    tensors, metadata = read_lora(path)
    if cfg is None:
        meta = json.loads(metadata.get(ADAPTER_METADATA_KEY, "{}"))
        ranks = [t.shape[0] for k, t in tensors.items() if "lora_A" in k or "lora.down" in k]
        if not ranks:
            raise ModelError(f"{path}: no LoRA tensors found")
        cfg = LoRAConfig(rank=int(meta.get("unet.r", ranks[0])),
                         alpha=float(meta.get("unet.lora_alpha", ranks[0])),
                         target_modules=list(meta.get("unet.target_modules", ["to_q", "to_k", "to_v", "to_out.0"])))
    add_lora(unet, cfg)
    state = convert_unet_state_dict_to_peft(
        {k.removeprefix("unet."): v for k, v in tensors.items() if k.startswith("unet.")})
    try:
        result = set_peft_model_state_dict(unet, state)
    except RuntimeError as err:
        raise ModelError(f"{path}: adapter does not match this UNet ({str(err).splitlines()[0]})") from None
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelError(f"{path}: adapter does not match this UNet (unexpected key {unexpected[0]})")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ModelError(f"{path}: adapter does not match this UNet (missing key {missing[0]})")
