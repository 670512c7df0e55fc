"""The in-memory dataset every method and attack consumes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from privdiff.errors import DataError


@dataclass(frozen=True)
class Example:
    """One private or public example.

    Attributes:
        id: stable identifier, unique in its dataset (used by the membership manifest).
        image: (H, W, 3) uint8 RGB.
        caption: the text prompt.
        conditioning: optional (H, W, 3) uint8 RGB conditioning image (ControlNet).
    """

    id: str
    image: np.ndarray
    caption: str
    conditioning: np.ndarray | None = None


@dataclass
class ImageDataset:
    """A named list of examples with a content hash (recorded by manifests and runs)."""

    name: str
    examples: list[Example]
    _hash: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.examples:
            raise DataError(f"dataset '{self.name}' is empty")
        ids = [ex.id for ex in self.examples]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"dataset '{self.name}' has duplicate example id '{dup}'")
        self._index = {ex.id: i for i, ex in enumerate(self.examples)}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    @property
    def image_size(self) -> int:
        return self.examples[0].image.shape[0]

    @property
    def content_hash(self) -> str:
        """sha256 over ids, captions and pixels, in order."""
        if self._hash is None:
            h = hashlib.sha256()
            for ex in self.examples:
                h.update(ex.id.encode() + b"\0" + ex.caption.encode() + b"\0")
                h.update(np.ascontiguousarray(ex.image).tobytes())
                if ex.conditioning is not None:
                    h.update(np.ascontiguousarray(ex.conditioning).tobytes())
            self._hash = h.hexdigest()
        return self._hash

    def subset(self, ids: list[str]) -> "ImageDataset":
        missing = [i for i in ids if i not in self._index]
        if missing:
            raise DataError(f"dataset '{self.name}' has no example '{missing[0]}'")
        return ImageDataset(self.name, [self.examples[self._index[i]] for i in ids])

    def images_tensor(self) -> torch.Tensor:
        """All images as a float tensor in [-1, 1], shape (N, 3, H, W)."""
        return to_model_tensor(np.stack([ex.image for ex in self.examples]))

    def captions(self) -> list[str]:
        return [ex.caption for ex in self.examples]


def to_model_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8_images(tensor: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((tensor.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def pick_subset(total: int, num_examples: int | None, seed: int) -> list[int]:
    """A seeded subset of `num_examples` indices (all, in order, when None)."""
    if num_examples is None:
        return list(range(total))
    if num_examples > total:
        raise DataError(f"asked for {num_examples} examples but only {total} exist")
    return sorted(np.random.RandomState(seed).permutation(total)[:num_examples].tolist())
