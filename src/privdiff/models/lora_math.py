"""UNet LoRA layers as matrices: reading any common file format, writing, and SVD re-factoring.

A shared LoRA file is read into a list of `LoRALayer`s (down = A, up = B, alpha), one per adapted
UNet module, in a fixed order (sorted by module name), whatever the file's format:

- diffusers / privdiff (`save_lora`): `unet.<module>.lora.down.weight` / `.lora.up.weight`, or the
  newer `unet.<module>.lora_A.weight` / `.lora_B.weight`, with the adapter config (r, lora_alpha...)
  as JSON in the header key `lora_adapter_metadata`;
- peft: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, with or without a `unet.`
  prefix, alpha from an `adapter_config.json` next to the file (peft's `save_pretrained` layout);
- kohya sd-scripts: `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`.

Key conversion is diffusers' own (`lora_state_dict` for kohya, `convert_unet_state_dict_to_peft` for
the rest). The encoder reads UNet layers only (docs/design/weights-attack.md §12.3);
`read_text_encoder_lora` reads a text-encoder adapter so that defences can carry it along.
`canonical_layers` is the `canonical` input mode of weights-attack.md §5: each layer re-factored from its exact
weight change ΔW = (α/r)·B·A, so it depends neither on the initialisation θ₀ nor on the A/B gauge.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_unet_state_dict_to_peft
from safetensors.torch import save_file

from privdiff.config import LoRAConfig
from privdiff.errors import ConfigError, ModelError
from privdiff.models.lora import (
    ADAPTER_METADATA_KEY,
    LORA_WEIGHT_NAME,
    adapter_metadata,
    header_config,
    read_lora,
)
from privdiff.runs.files import atomic_replace
from privdiff.seeding import generator

log = logging.getLogger("privdiff.weights")

PEFT_CONFIG_NAME = "adapter_config.json"
KOHYA_UNET_PREFIX = "lora_unet_"
# Top-level modules of diffusers' UNet2DConditionModel: a key under one of them is a UNet key, so peft
# files without a `unet.` prefix are told apart from text-encoder ones (`text_model.`...).
UNET_ROOTS = frozenset({"conv_in", "time_proj", "time_embedding", "encoder_hid_proj", "class_embedding",
                        "add_time_proj", "add_embedding", "down_blocks", "mid_block", "up_blocks",
                        "conv_norm_out", "conv_out", "position_net"})
_KEY_PREFIXES = ("unet.", "base_model.model.")
_ROLE_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"))


@dataclass(frozen=True, eq=False)  # eq=False: fields are tensors, compare them explicitly
class LoRALayer:
    """One adapted UNet module: its weight changes by ΔW = (alpha / rank) · up @ down.

    Attributes:
        name: the module path in diffusers naming, e.g.
            `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
        down: A, shape (rank, d_in).
        up: B, shape (d_out, rank).
        alpha: the LoRA alpha (peft's `lora_alpha`, kohya's `.alpha`).
    """

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    def __post_init__(self) -> None:
        if self.down.dim() != 2 or self.up.dim() != 2:
            raise ModelError(f"LoRA layer {self.name}: only 2-D (linear) LoRA matrices are supported, got "
                             f"lora_A {tuple(self.down.shape)} and lora_B {tuple(self.up.shape)}")
        if self.up.shape[1] != self.down.shape[0]:
            raise ModelError(f"LoRA layer {self.name}: lora_A {tuple(self.down.shape)} and lora_B "
                             f"{tuple(self.up.shape)} have different ranks")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW = scale · B @ A, shape (d_out, d_in), computed in `dtype` (default: the layer's)."""
        dtype = dtype or self.up.dtype
        return self.scale * (self.up.to(dtype) @ self.down.to(dtype))


def _unet_matrix(key: str) -> tuple[str, str] | None:
    """(module name, "down" | "up") for a peft-named UNet LoRA key; None for any other key.

    Raises:
        ModelError: a UNet LoRA tensor that is not a plain A/B matrix (DoRA magnitudes, biases...).
    """
    name = key
    while stripped := next((name[len(p):] for p in _KEY_PREFIXES if name.startswith(p)), None):
        name = stripped
    if name.split(".", 1)[0] not in UNET_ROOTS or "lora" not in name:
        return None
    for suffix, role in _ROLE_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)], role
    raise ModelError(f"unsupported UNet LoRA tensor '{key}' (only plain LoRA A/B matrices can be read)")


def layers_from_state_dict(state_dict: Mapping[str, torch.Tensor],
                           alpha: float | Mapping[str, float] | None = None) -> list[LoRALayer]:
    """UNet LoRA layers from in-memory tensors, sorted by module name.

    Accepts diffusers naming (`X.lora.down.weight`, old `processor.to_q_lora.down.weight`) and peft
    naming (`X.lora_A.weight`, e.g. `get_peft_model_state_dict(unet)`), with or without `unet.` /
    `base_model.model.` prefixes. Tensors are detached copies in float32 on their own device.
    LoRA tensors outside the UNet are skipped (logged).

    Args:
        state_dict: the LoRA tensors.
        alpha: one alpha for every layer, or a map module name -> alpha; a layer without one gets
            alpha = rank (scale 1, what diffusers assumes for a file without alphas).

    Raises:
        ModelError: no UNet LoRA tensors, an A without its B (or the reverse), mismatched shapes.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    skipped = 0
    for key, tensor in convert_unet_state_dict_to_peft(dict(state_dict)).items():
        parsed = _unet_matrix(key)
        if parsed is None:
            skipped += "lora" in key.lower()
            continue
        pairs.setdefault(parsed[0], {})[parsed[1]] = tensor.detach().float().contiguous()
    if not pairs:
        raise ModelError("no UNet LoRA tensors found")
    if skipped:
        log.debug("ignored %d LoRA tensors outside the UNet (e.g. text encoder)", skipped)
    layers = []
    for name in sorted(pairs):
        found = pairs[name]
        if len(found) != 2:
            missing = "lora_B (up)" if "down" in found else "lora_A (down)"
            raise ModelError(f"LoRA layer {name}: {missing} is missing")
        rank = found["down"].shape[0]
        value = alpha.get(name) if isinstance(alpha, Mapping) else alpha
        layers.append(LoRALayer(name, found["down"], found["up"], float(rank if value is None else value)))
    return layers


def _adapter_config(path: Path, metadata: dict[str, str]) -> dict:
    """The UNet adapter config: header `lora_adapter_metadata`, else a peft `adapter_config.json` beside."""
    sidecar = path.parent / PEFT_CONFIG_NAME
    try:
        if ADAPTER_METADATA_KEY in metadata:
            raw = json.loads(metadata[ADAPTER_METADATA_KEY])
        elif sidecar.is_file():
            raw = json.loads(sidecar.read_text(encoding="utf-8"))
        else:
            return {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raw = None
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: the LoRA adapter config is not a JSON object")
    # diffusers prefixes the config per model (`unet.r`); peft and single-model files have bare keys.
    return {k.removeprefix("unet."): v for k, v in raw.items() if k.startswith("unet.") or "." not in k}


def _config_alpha(name: str, rank: int, config: dict) -> float:
    """A layer's alpha under a peft config (alpha_pattern, rsLoRA), as an alpha with scale = alpha/rank."""
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):  # peft's own matching rule (get_pattern_key)
            alpha = float(value)
            break
    if config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha/sqrt(r); keep `scale = alpha / rank` exact
    return alpha


def read_unet_lora(path: str | Path) -> list[LoRALayer]:
    """The UNet LoRA layers of a diffusers, peft or kohya safetensors file, sorted by module name.

    Alpha comes from, in order: kohya's per-layer `.alpha` tensors; the header's adapter config
    (`unet.lora_alpha`, peft `alpha_pattern`, rsLoRA); a peft `adapter_config.json` next to the file.
    When none gives one, alpha = rank (scale 1): kohya's convention for a missing `.alpha` and what
    diffusers assumes when loading such a file. Tensors are returned in float32.

    Raises:
        ModelError: missing or unreadable file, no UNet LoRA tensors, mismatched A/B shapes,
            unsupported LoRA variants (DoRA, convolution LoRA), an adapter config that is not JSON.
    """
    path = Path(path)
    tensors, metadata = read_lora(path)
    config = _adapter_config(path, metadata)
    # diffusers silently drops kohya's `dora_scale`; a DoRA update is not (α/r)·B·A, so refuse it.
    if config.get("use_dora") or any("dora_scale" in k or "lora_magnitude_vector" in k for k in tensors):
        raise ModelError(f"{path}: DoRA adapters are not supported (their weight change is not (alpha/r)·B·A)")
    try:
        # Converts kohya keys to diffusers ones and returns kohya's alphas; other formats pass through.
        state, network_alphas = StableDiffusionPipeline.lora_state_dict(dict(tensors))
    except Exception as err:  # diffusers' converters raise assorted errors on foreign keys
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        raise ModelError(f"{path}: not a LoRA file diffusers can convert ({first_line})") from None
    kohya_alphas = {}
    for key, value in (network_alphas or {}).items():  # keyed `<its lora.down key>.alpha`
        converted = next(iter(convert_unet_state_dict_to_peft({key.removesuffix(".alpha"): None})))
        if parsed := _unet_matrix(converted):
            kohya_alphas[parsed[0]] = float(value)
    try:
        layers = layers_from_state_dict(state)
    except ModelError as err:
        raise ModelError(f"{path}: {err}") from None
    return [replace(layer, alpha=kohya_alphas.get(layer.name, _config_alpha(layer.name, layer.rank, config)))
            for layer in layers]


_TEXT_ENCODER_SUFFIXES = ((".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
                          (".lora_A.weight", "down"), (".lora_B.weight", "up"))


def read_text_encoder_lora(path: str | Path) -> list[LoRALayer]:
    """The text-encoder LoRA layers (`text_encoder.` keys, diffusers or peft naming) of a file; [] if none.

    Alpha comes from the header's `text_encoder.lora_alpha` (else alpha = rank). Kohya's `lora_te_`
    keys are not read.

    Raises:
        ModelError: unreadable file, an A without its B (or the reverse), other tensor kinds.
    """
    path = Path(path)
    tensors, metadata = read_lora(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith("text_encoder."):
            continue
        name = key.removeprefix("text_encoder.")
        role = next(((name[:-len(suffix)], r) for suffix, r in _TEXT_ENCODER_SUFFIXES if name.endswith(suffix)), None)
        if role is None:
            raise ModelError(f"{path}: unsupported text-encoder LoRA tensor '{key}'")
        pairs.setdefault(role[0], {})[role[1]] = tensor.detach().float().contiguous()
    layers = []
    for name in sorted(pairs):
        if len(pairs[name]) != 2:
            raise ModelError(f"{path}: text-encoder LoRA layer {name} lacks its A or B matrix")
        alpha = header_config(path, metadata, "text_encoder", pairs[name]["down"].shape[0]).alpha
        layers.append(LoRALayer(name, pairs[name]["down"], pairs[name]["up"], alpha))
    return layers


def _file_rank_alpha(layers: Sequence[LoRALayer]) -> tuple[int, float]:
    if not layers:
        raise ModelError("no LoRA layers to write")
    ranks, alphas = {layer.rank for layer in layers}, {layer.alpha for layer in layers}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ModelError(f"the diffusers LoRA format stores one rank and one alpha per file; layers have ranks "
                         f"{sorted(ranks)} and alphas {sorted(alphas)}")
    return ranks.pop(), alphas.pop()


def _written_config(layers: Sequence[LoRALayer]) -> dict:
    """The header config of `layers`; `target_modules` lists full module names, so exactly these load."""
    rank, alpha = _file_rank_alpha(layers)
    return adapter_metadata(LoRAConfig(rank=rank, alpha=alpha, target_modules=[layer.name for layer in layers]))


def write_unet_lora(path: str | Path, layers: Sequence[LoRALayer], metadata: dict[str, str] | None = None, *,
                    text_encoder_layers: Sequence[LoRALayer] = ()) -> Path:
    """Writes `layers` atomically in the diffusers LoRA format privdiff's `save_lora` writes.

    Same keys (`unet.<module>.lora.down.weight` / `.lora.up.weight`) and header (`format`, and the
    adapter config in `lora_adapter_metadata`, both produced by diffusers' `save_lora_weights`), so
    `pipe.load_lora_weights` and `load_lora_into_unet` read it. `target_modules` lists the full module
    names, so a file adapting only some of the modules with a given suffix loads exactly those.

    Args:
        path: destination `.safetensors` file.
        layers: all with the same rank and alpha.
        metadata: further header fields (string values), e.g. `privdiff.defence`.
        text_encoder_layers: a text-encoder adapter to write too (`text_encoder.` keys; one rank and alpha).

    Raises:
        ModelError: no layers, or layers with different ranks or alphas.
    """
    unet_layers, te_layers = {}, {}
    for layer in layers:
        unet_layers[f"{layer.name}.lora.down.weight"] = layer.down.detach().cpu().contiguous()
        unet_layers[f"{layer.name}.lora.up.weight"] = layer.up.detach().cpu().contiguous()
    for layer in text_encoder_layers:
        te_layers[f"{layer.name}.lora_linear_layer.down.weight"] = layer.down.detach().cpu().contiguous()
        te_layers[f"{layer.name}.lora_linear_layer.up.weight"] = layer.up.detach().cpu().contiguous()
    with tempfile.TemporaryDirectory() as tmp:
        # As in save_lora: diffusers chooses key prefixes and header layout, so it reads back what it expects.
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=unet_layers,
            unet_lora_adapter_metadata=_written_config(layers), text_encoder_lora_layers=te_layers or None,
            text_encoder_lora_adapter_metadata=_written_config(text_encoder_layers) if te_layers else None)
        tensors, header = read_lora(Path(tmp) / LORA_WEIGHT_NAME)
    header.update(metadata or {})
    path = Path(path)
    atomic_replace(path, lambda tmp_path: save_file(tensors, str(tmp_path), metadata=header))
    return path


def write_kohya(path: str | Path, layers: Sequence[LoRALayer], metadata: dict[str, str] | None = None) -> Path:
    """Writes `layers` atomically in kohya sd-scripts naming (the inverse of reading a kohya file).

    Keys `lora_unet_<module, dots as underscores>.lora_down.weight` / `.lora_up.weight` and a scalar
    float32 `.alpha` per layer (so ranks and alphas may differ between layers). No `ss_*` training
    metadata is written; the header holds `format` plus `metadata`. Caveat: diffusers 0.42.1's
    `load_lora_weights` applies a single alpha (the most common one) to every layer of a kohya file,
    so per-layer alphas survive `read_unet_lora` but not diffusers' loader.
    """
    tensors = {}
    for layer in layers:
        stem = KOHYA_UNET_PREFIX + layer.name.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = layer.down.detach().cpu().contiguous()
        tensors[f"{stem}.lora_up.weight"] = layer.up.detach().cpu().contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    header = {"format": "pt", **(metadata or {})}
    path = Path(path)
    atomic_replace(path, lambda tmp_path: save_file(tensors, str(tmp_path), metadata=header))
    return path


def refactor(delta_w: torch.Tensor, rank: int, keep: int | None = None,
             scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (up, down) of the rank-`keep` truncation of `delta_w`, zero-padded to `rank`.

    With the SVD ΔW = U Σ Vᵀ (in float64) and the top `keep` singular triplets,
    up = U √(Σ/scale) and down = √(Σ/scale) Vᵀ: the LoRA scale is divided out evenly between the two
    factors, so that `scale * up @ down` equals the truncated ΔW (pass the layer's `alpha / rank`).
    Columns of up / rows of down beyond `keep` are zero, so the file shape stays (d_out, rank) and
    (rank, d_in). Sign convention: each kept column of U has its largest-magnitude entry positive
    (the matching row of Vᵀ flips with it), which makes the factors a function of ΔW alone as long as
    the kept singular values are distinct and that entry is not tied in magnitude; otherwise they
    are determined only up to sign (or rotation within a repeated singular value).

    Args:
        delta_w: the weight change, shape (d_out, d_in).
        rank: the rank of the returned factors (columns of up, rows of down).
        keep: singular values kept, 1..rank (default rank); capped at min(d_out, d_in).
        scale: the LoRA scale alpha / rank the factors will be multiplied by; positive.

    Returns:
        (up, down) of shapes (d_out, rank) and (rank, d_in), in `delta_w`'s dtype and device.

    Raises:
        ConfigError: `keep` outside 1..rank.
    """
    keep = rank if keep is None else keep
    if not 1 <= keep <= rank:
        raise ConfigError(f"rank truncation must keep between 1 and {rank} singular values, got {keep}")
    if scale <= 0:
        raise ValueError(f"the LoRA scale must be positive, got {scale}")
    u, sigma, vh = torch.linalg.svd(delta_w.double(), full_matrices=False)
    k = min(keep, sigma.numel())
    u, sigma, vh = u[:, :k], sigma[:k], vh[:k]
    columns = torch.arange(k, device=u.device)
    signs = torch.sign(u[u.abs().argmax(dim=0), columns])
    signs[signs == 0] = 1
    u, vh = u * signs, vh * signs[:, None]
    root = (sigma / scale).sqrt()
    up = delta_w.new_zeros((delta_w.shape[0], rank), dtype=torch.float64)
    down = delta_w.new_zeros((rank, delta_w.shape[1]), dtype=torch.float64)
    up[:, :k] = u * root
    down[:k] = root[:, None] * vh
    return up.to(delta_w.dtype), down.to(delta_w.dtype)


def canonical_layers(layers: Sequence[LoRALayer]) -> list[LoRALayer]:
    """The `canonical` input mode (weights-attack.md §5): every layer re-factored by SVD from its exact ΔW.

    Same names, ranks and alphas; `scale * up @ down` equals the layer's ΔW (up to float rounding).
    The result is invariant under A -> M A, B -> B M⁻¹ for any invertible M, exactly when the
    singular values of ΔW are distinct (see `refactor` for the sign convention), up to sign otherwise.
    """
    canonical = []
    for layer in layers:
        up, down = refactor(layer.delta_weight(torch.float64), layer.rank, scale=layer.scale)
        canonical.append(replace(layer, up=up.to(layer.up.dtype), down=down.to(layer.down.dtype)))
    return canonical



DEFAULT_INIT_SEED = 0  # the "default seeded init" granted to the attacker in `delta` mode


def lora_modules(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The peft-adapted modules (adapter "default") of `unet`, in canonical (module-name) order."""
    modules = [(name, m) for name, m in unet.named_modules()
               if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]
    return sorted(modules, key=lambda item: item[0])


def live_layers(unet: torch.nn.Module) -> list[LoRALayer]:
    """The adapter attached to `unet` (peft, adapter "default") as detached layers, canonical order."""
    layers = []
    for name, module in lora_modules(unet):
        down = module.lora_A["default"].weight.detach().clone()
        up = module.lora_B["default"].weight.detach().clone()
        rank = down.shape[0]
        alpha = float(module.scaling["default"]) * rank
        layers.append(LoRALayer(name=name, down=down, up=up, alpha=alpha))
    return layers


@torch.no_grad()
def reset_lora(unet: torch.nn.Module, seed: int = DEFAULT_INIT_SEED) -> None:
    """Sets the adapter to theta_0 of `seed`: lora_A ~ N(0, (1/r)^2) (peft's "gaussian" init), lora_B = 0.

    Victims and shadows both start here, so `delta` mode's theta_0 is exactly what the attacker
    recomputes with `initial_layers`.
    """
    rng = generator(seed, "lora-init")
    modules = lora_modules(unet)
    if not modules:
        raise ValueError("the UNet carries no LoRA adapter")
    for _, module in modules:
        down = module.lora_A["default"].weight
        down.copy_(torch.randn(down.shape, generator=rng) / down.shape[0])
        module.lora_B["default"].weight.zero_()


def initial_layers(layers: list[LoRALayer], seed: int = DEFAULT_INIT_SEED) -> list[LoRALayer]:
    """theta_0 for adapters shaped like `layers` (the same draws as `reset_lora`, same order)."""
    rng = generator(seed, "lora-init")
    return [LoRALayer(name=layer.name, down=torch.randn(layer.down.shape, generator=rng) / layer.down.shape[0],
                      up=torch.zeros_like(layer.up), alpha=layer.alpha) for layer in layers]


__all__ = ["DEFAULT_INIT_SEED", "LoRALayer", "initial_layers", "live_layers", "lora_modules", "reset_lora", "canonical_layers", "layers_from_state_dict", "read_unet_lora", "refactor",
           "write_kohya", "write_unet_lora"]
