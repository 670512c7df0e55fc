"""Datasets (built-in and image folders) and the membership manifest."""

from __future__ import annotations

from pathlib import Path

from privdiff.config import DataConfig
from privdiff.data.builtin import BUILTIN_DATASETS
from privdiff.data.examples import Example, ImageDataset, pick_subset
from privdiff.data.folder import load_image_folder
from privdiff.data.manifest import (
    ROLES,
    Manifest,
    build_manifest,
    load_manifest,
    role_counts,
)
from privdiff.errors import DataError


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """A built-in dataset by name, or an imagefolder by path; subset to `num_examples` (seeded).

    Raises:
        DataError: unknown name, missing folder, invalid data, or too few examples.
    """
    if cfg.name in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[cfg.name](cfg.image_size, cfg.num_examples, cfg.seed)
    path = Path(cfg.name)
    if not path.exists():
        raise DataError(f"unknown dataset '{cfg.name}': not a built-in ({', '.join(BUILTIN_DATASETS)}) "
                        f"and no such folder")
    dataset = load_image_folder(path, cfg.image_size, cfg.max_image_pixels)
    if cfg.num_examples is not None and cfg.num_examples < len(dataset):
        keep = pick_subset(len(dataset), cfg.num_examples, cfg.seed)
        dataset = dataset.subset([dataset[i].id for i in keep])
    return dataset


__all__ = ["BUILTIN_DATASETS", "ROLES", "Example", "ImageDataset", "Manifest", "build_manifest",
           "load_dataset", "load_image_folder", "load_manifest", "role_counts"]
