"""Pluggable feature extractors for FID/KID/accuracy, all loaded from local files only.

Specs accepted by `load_extractor` (evaluation.md §2):
    digits | glyphs | fill       a classifier shipped with privdiff (hash-verified)
    classifier:FOLDER            a classifier folder written by `privdiff extractor train`
    inception:FILE               the standard FID Inception exported as TorchScript (2048-d pool)
    clip:FOLDER                  a local Hugging Face CLIP folder (image tower, projected embedding)
    torchscript:FILE             any module mapping N x 3 x H x W in [0, 1] to N x d
Hub ids and URLs are refused: nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from privdiff.errors import ConfigError, ModelError
from privdiff.models.load import sha256_file, verify_checksums, write_checksums

EXTRACTORS_DIR = Path(__file__).resolve().parent.parent / "assets" / "extractors"
WEIGHTS_NAME = "extractor.safetensors"
SHIPPED = ("digits", "glyphs", "fill")
# Datasets without a classifier of their own get generic features from the glyphs classifier.
DEFAULT_FOR_DATASET = {"digits": "digits", "glyphs": "glyphs", "fill": "fill"}
FALLBACK_EXTRACTOR = "glyphs"


def default_extractor_spec(dataset: str) -> str:
    return DEFAULT_FOR_DATASET.get(dataset, FALLBACK_EXTRACTOR)


def as_float_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) uint8 or (N, C, H, W) float in [0, 1] -> (N, 3, H, W) float in [0, 1]."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError("numpy images must be (N, H, W, C) uint8")
        images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    images = images.float()
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected N x C x H x W images with 1 or 3 channels, got {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class FeatureExtractor(ABC):
    """Maps images to d-dimensional features; `id` names the weights by content hash."""

    id: str
    input_size: int
    label_names: dict[str, list[str]] = {}  # classifier heads, empty for feature-only extractors

    @abstractmethod
    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def features(self, x: torch.Tensor) -> torch.Tensor: ...

    def classify(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise ConfigError(f"feature extractor {self.id} has no classifier head")

    @torch.no_grad()
    def extract(self, images: np.ndarray | torch.Tensor, batch_size: int = 256
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Features (N, d) float64 and, for classifiers, predicted label indices per head."""
        feats, labels = [], {name: [] for name in self.label_names}
        for i in range(0, len(images), batch_size):
            x = self.preprocess(images[i:i + batch_size])
            feats.append(self.features(x).double())
            for name, logits in (self.classify(x) if self.label_names else {}).items():
                labels[name].append(logits.argmax(1))
        out = torch.cat(feats).numpy()
        if not np.isfinite(out).all():
            raise ModelError(f"feature extractor {self.id} produced NaN or inf features")
        return out, {k: torch.cat(v).numpy() for k, v in labels.items()}


class ClassifierNet(nn.Module):
    """Three conv stages (32, 64, 128; 3x3, GroupNorm, SiLU, stride 2), global average pooling,
    Linear(128 -> 64) as the feature layer (pre-activation), and one linear head per label."""

    def __init__(self, heads: dict[str, int], channels: tuple[int, ...] = (32, 64, 128), dim: int = 64):
        super().__init__()
        layers, previous = [], 3
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
            previous = width
        self.stages = nn.Sequential(*layers)
        self.feature = nn.Linear(previous, dim)
        self.heads = nn.ModuleDict({name: nn.Linear(dim, size) for name, size in heads.items()})

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(self.stages(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.silu(self.embed(x))
        return {name: head(h) for name, head in self.heads.items()}


def classifier_preprocess(images: np.ndarray | torch.Tensor, size: int = 32) -> torch.Tensor:
    """Images -> 3 x size x size in [-1, 1] (grayscale replicated, antialiased bilinear resize)."""
    return resize(as_float_images(images), size) * 2.0 - 1.0


class ClassifierExtractor(FeatureExtractor):
    """A privdiff classifier: features are the 64-d pre-activation layer."""

    def __init__(self, net: ClassifierNet, label_names: dict[str, list[str]], ident: str, input_size: int = 32):
        self.net = net.eval()
        self.label_names = label_names
        self.id = ident
        self.input_size = input_size

    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        return classifier_preprocess(images, self.input_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x)

    def classify(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(x)


def save_classifier(folder: Path, net: ClassifierNet, label_names: dict[str, list[str]], name: str) -> Path:
    """Writes FOLDER/extractor.safetensors (labels in the header) and SHA256SUMS."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    # One metadata key: safetensors keeps the header metadata in a hash map whose order varies
    # between writes, so two keys would make identical weights hash differently.
    metadata = {"privdiff.extractor": json.dumps({"name": name, "labels": label_names}, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / WEIGHTS_NAME),
              metadata=metadata)
    write_checksums(folder)
    return folder / WEIGHTS_NAME


def load_classifier(folder: Path) -> ClassifierExtractor:
    """Loads and hash-verifies a classifier folder (refuses a file that does not match SHA256SUMS)."""
    from safetensors import safe_open

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise ModelError(f"feature extractor not found: {path}")
    if not (folder / "SHA256SUMS").is_file():
        raise ModelError(f"{folder}: no SHA256SUMS next to the extractor weights; refusing unverified weights")
    verify_checksums(folder)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        header = json.loads(meta["privdiff.extractor"])
        labels = {head: header["labels"][head] for head in sorted(header["labels"])}
        net = ClassifierNet({k: len(v) for k, v in labels.items()})
        net.load_state_dict(load_file(str(path)))
    except (KeyError, ValueError, RuntimeError, OSError) as err:
        raise ModelError(f"{path} is not a privdiff classifier: {str(err).splitlines()[0]}") from err
    name = header.get("name", folder.name)
    return ClassifierExtractor(net, labels, f"{name}@sha256:{sha256_file(path)[:16]}")


class TorchScriptExtractor(FeatureExtractor):
    """Any TorchScript module: N x 3 x H x W in [0, 1] (or [0, 255] for Inception) -> N x d."""

    def __init__(self, path: Path, kind: str):
        import warnings

        try:
            with warnings.catch_warnings():  # the FID Inception only exists as TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                self.module = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as err:
            hint = (" (state-dict files are not supported: export the FID Inception as TorchScript)"
                    if kind == "inception" else "")
            raise ModelError(f"{path} is not a TorchScript file{hint}") from err
        self.kind = kind
        self.input_size = 299 if kind == "inception" else 0
        self.id = f"{kind}:{path.stem}@sha256:{sha256_file(path)[:16]}"

    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = as_float_images(images)
        if self.kind == "inception":  # the FID Inception takes 299 px in [0, 255]
            return resize(x, 299) * 255.0
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "inception":
            try:
                out = self.module(x, return_features=True)
            except RuntimeError:
                out = self.module(x)
        else:
            out = self.module(x)
        if out.ndim != 2:
            out = out.flatten(1)
        return out


class CLIPExtractor(FeatureExtractor):
    """The image tower of a local CLIP folder; features are the projected image embeddings."""

    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, folder: Path):
        from transformers import CLIPVisionModelWithProjection

        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True).eval()
        except (OSError, ValueError) as err:
            raise ModelError(f"{folder} is not a local CLIP folder: {str(err).splitlines()[0]}") from err
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        digest = sha256_file(weights[0])[:16] if weights else "unknown"
        self.input_size = self.model.config.image_size
        self.id = f"clip:{folder.name}@sha256:{digest}"
        self._mean = torch.tensor(self.MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(self.STD).view(1, 3, 1, 1)

    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        return (resize(as_float_images(images), self.input_size) - self._mean) / self._std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).image_embeds


def _local_path(kind: str, value: str) -> Path:
    if "://" in value or value.startswith(("hf:", "hub:")):
        raise ConfigError(f"--features {kind}:{value}: URLs and hub ids are refused; privdiff never "
                          f"downloads weights, give a local path")
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"--features {kind}:{value}: no such local file or folder (hub ids are not "
                          f"downloaded)")
    return path


def load_extractor(spec: str) -> FeatureExtractor:
    """Resolves a feature-extractor spec (module docstring) to a loaded, verified extractor."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if spec in SHIPPED:
        return load_classifier(EXTRACTORS_DIR / spec)
    kind, sep, value = spec.partition(":")
    if not sep or kind not in ("classifier", "inception", "clip", "torchscript"):
        raise ConfigError(f"unknown feature extractor '{spec}': use one of {', '.join(SHIPPED)}, "
                          f"classifier:FOLDER, inception:FILE, clip:FOLDER or torchscript:FILE")
    path = _local_path(kind, value)
    if kind == "classifier":
        return load_classifier(path)
    if kind == "clip":
        return CLIPExtractor(path)
    return TorchScriptExtractor(path, kind)
