"""Image folders in the Hugging Face `imagefolder` layout, validated before anything is written.

    my_data/
      metadata.jsonl     {"file_name": "0001.png", "text": "...", "conditioning_image": "c/0001.png"}
      0001.png ...

Every listed image must exist and decode; every image in the folder must be listed; file names are
unique; no listed path leaves the folder (`..`, absolute paths, symlinks pointing outside); images
above the pixel cap are refused from their header, before decoding. Any problem raises `DataError`
naming the file, before a single output is created.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from privdiff.config import MAX_IMAGE_PIXELS
from privdiff.data.examples import Example, ImageDataset
from privdiff.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Modes with an explicit, lossless-enough conversion to 3 RGB channels; anything else
# (CMYK and YCbCr without a colour profile, LAB, HSV, float, 32-bit int) is refused rather than guessed.
SUPPORTED_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA"}
# 16-bit greyscale (medical scans, depth maps): scaled to 8 bits (v / 257, rounded), exact at the ends.
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
METADATA_FILE = "metadata.jsonl"


def _sixteen_bit_to_l(img: Image.Image, path: Path) -> Image.Image:
    values = np.asarray(img, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError(f"{path}: 32-bit integer image with values outside 0..65535 (convert it to 8 or 16 bits)")
    return Image.fromarray(np.rint(values / 257).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Converts a supported mode to RGB; transparency is composited onto black.

    Raises:
        DataError: unsupported mode.
    """
    if img.mode in SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_l(img, path).convert("RGB")
    if img.mode not in SUPPORTED_MODES:
        raise DataError(f"{path}: unsupported image mode {img.mode} (convert it to RGB or L first)")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def read_image(path: Path, size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decodes, converts and resizes one image: centre crop to a square, bicubic to `size`.

    Args:
        max_pixels: images whose header declares more pixels are refused before decoding.

    Returns:
        (size, size, 3) uint8.

    Raises:
        DataError: missing, unreadable, truncated, oversized or unsupported image.
    """
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap decides, below
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise DataError(f"{path}: {width} x {height} pixels exceeds the cap of {max_pixels:,} "
                                    f"(a decompression bomb, or raise data.max_image_pixels)")
                img.load()  # forces a full decode: truncated files fail here, not later
                rgb = to_rgb(img, path)
    except DataError:
        raise
    except Image.DecompressionBombError:  # PIL's own limit, met before our check could run
        raise DataError(f"{path}: declares more pixels than PIL will open (a decompression bomb)") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (corrupt or unknown format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: corrupt or truncated image ({str(err).splitlines()[0]})") from None
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.BICUBIC), dtype=np.uint8)


def _safe_relative(root: Path, name: object, line_no: int, key: str) -> Path:
    meta = root / METADATA_FILE
    if not isinstance(name, str) or not name:
        raise DataError(f"{meta}:{line_no}: '{key}' must be a non-empty string")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise DataError(f"{meta}:{line_no}: '{key}' must be a path inside the folder, got '{name}'")
    path = root / rel
    if not path.resolve().is_relative_to(root.resolve()):  # a symlink pointing out of the folder
        raise DataError(f"{path}: resolves outside the dataset folder (symlink to {path.resolve()})")
    return path


def _read_metadata(root: Path) -> list[tuple[int, dict]]:
    meta = root / METADATA_FILE
    if not meta.is_file():
        raise DataError(f"{root}: no {METADATA_FILE} (imagefolder layout expected)")
    try:
        text = meta.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line_no = meta.read_bytes()[:err.start].count(b"\n") + 1
        raise DataError(f"{meta}:{line_no}: not UTF-8 text (byte {err.start}); save the metadata as UTF-8") from None
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{meta}:{line_no}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise DataError(f"{meta}:{line_no}: each line must be an object with a 'file_name'")
        rows.append((line_no, row))
    return rows


def load_image_folder(root: str | Path, image_size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> ImageDataset:
    """Loads and validates an imagefolder dataset (all images decoded up front).

    Args:
        max_pixels: the per-image pixel cap (see `read_image`).

    Raises:
        DataError: any of the problems listed in the module docstring.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    rows = _read_metadata(root)
    if not rows:
        raise DataError(f"{root / METADATA_FILE}: dataset is empty (no entries)")
    seen: dict[str, int] = {}
    examples = []
    for line_no, row in rows:
        image_path = _safe_relative(root, row["file_name"], line_no, "file_name")
        name = PurePosixPath(row["file_name"]).as_posix()
        if name in seen:
            raise DataError(f"{root / METADATA_FILE}:{line_no}: duplicate file_name '{name}' "
                            f"(first on line {seen[name]})")
        seen[name] = line_no
        caption = row.get("text", "")
        if not isinstance(caption, str):
            raise DataError(f"{root / METADATA_FILE}:{line_no}: 'text' must be a string")
        conditioning = None
        if row.get("conditioning_image") is not None:
            cond_path = _safe_relative(root, row["conditioning_image"], line_no, "conditioning_image")
            conditioning = read_image(cond_path, image_size, max_pixels)
        examples.append(Example(id=name, image=read_image(image_path, image_size, max_pixels), caption=caption,
                                conditioning=conditioning))
    listed = set(seen) | {PurePosixPath(r["conditioning_image"]).as_posix() for _, r in rows
                          if isinstance(r.get("conditioning_image"), str)}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() in IMAGE_SUFFIXES and rel not in listed and not rel.startswith("."):
            raise DataError(f"{path}: image has no entry in {METADATA_FILE}")
    return ImageDataset(root.name, examples)
