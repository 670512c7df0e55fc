"""Built-in datasets, all generated or read offline from installed packages.

- `digits`: the 1,797 real handwritten 8x8 digits shipped inside scikit-learn (UCI optdigits).
- `faces`: the 100 LFW face crops (25x25 grayscale) shipped inside scikit-image (`lfw_subset`).
- `glyphs`: procedurally rendered letters (fonts shipped with matplotlib), random affine jitter,
  stroke width and colours; the public pre-training set (letters are to digits what public
  pre-training data is to the private set in the DP diffusion literature).
- `fill`: procedural fill-circles for ControlNet (circle outline -> filled coloured circle).
- `identities`: procedural faces of the base identity pool, captioned "a face" (`identities.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from privdiff.config import BUILTIN_DATASET_NAMES
from privdiff.data.examples import Example, ImageDataset, pick_subset
from privdiff.data.identities import load_identities
from privdiff.data.vocabulary import COLOURS, NUMBER_WORDS
from privdiff.errors import DataError

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
    "orange": (240, 140, 30), "purple": (140, 50, 180), "pink": (240, 130, 190),
    "white": (245, 245, 245), "black": (10, 10, 10), "gray": (128, 128, 128),
    "brown": (120, 75, 35), "cyan": (40, 210, 220), "magenta": (220, 40, 200),
}
assert set(PALETTE) == set(COLOURS)


def _resize(gray_or_rgb: np.ndarray, size: int) -> np.ndarray:
    """Float image in [0, 1] (H, W) or (H, W, 3) -> (size, size, 3) uint8, bicubic."""
    arr = np.clip(gray_or_rgb * 255.0, 0, 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    if img.mode == "L":
        img = img.convert("RGB")  # grayscale -> 3 model channels, explicitly
    return np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.uint8)


def load_digits(image_size: int, num_examples: int | None, seed: int) -> ImageDataset:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    order = pick_subset(len(bunch.images), num_examples, seed)
    examples = [Example(id=f"digits-{i:04d}", image=_resize(bunch.images[i] / 16.0, image_size),
                        caption=f"a handwritten digit {NUMBER_WORDS[int(bunch.target[i])]}")
                for i in order]
    return ImageDataset("digits", examples)


def load_faces(image_size: int, num_examples: int | None, seed: int) -> ImageDataset:
    from skimage.data import lfw_subset

    faces = lfw_subset()[:100]  # the first 100 of the 200 are faces, the rest are not
    order = pick_subset(len(faces), num_examples, seed)
    examples = [Example(id=f"faces-{i:03d}", image=_resize(faces[i], image_size),
                        caption="a grayscale photo of a face") for i in order]
    return ImageDataset("faces", examples)


def _font_files() -> list[Path]:
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    files = sorted(p for p in root.glob("*.ttf") if p.name.startswith(("DejaVu", "cm")))
    # Computer Modern symbol/extension fonts have no Latin letters.
    return [p for p in files if p.stem not in ("cmex10", "cmsy10", "cmmi10")]


def _two_colours(rng: np.random.RandomState) -> tuple[str, str]:
    names = sorted(PALETTE)
    fg, bg = rng.choice(len(names), size=2, replace=False)
    return names[fg], names[bg]


def load_glyphs(image_size: int, num_examples: int | None, seed: int) -> ImageDataset:
    rng = np.random.RandomState(seed)
    fonts = _font_files()
    if not fonts:
        raise DataError("glyphs: no fonts found in matplotlib's mpl-data/fonts/ttf")
    canvas = 4 * image_size  # render large, then downsample for anti-aliasing
    examples = []
    for i in range(num_examples or 10_000):
        letter = "abcdefghijklmnopqrstuvwxyz"[rng.randint(26)]
        char = letter.upper() if rng.rand() < 0.5 else letter
        if rng.rand() < 0.5:
            fg, bg = "white", "black"
        else:
            fg, bg = _two_colours(rng)
        font = ImageFont.truetype(str(fonts[rng.randint(len(fonts))]), size=int(canvas * 0.6))
        img = Image.new("RGB", (canvas, canvas), PALETTE[bg])
        draw = ImageDraw.Draw(img)
        stroke = int(rng.randint(0, 4))
        draw.text((canvas / 2, canvas / 2), char, font=font, fill=PALETTE[fg], anchor="mm",
                  stroke_width=stroke, stroke_fill=PALETTE[fg])
        img = _random_affine(img, rng, PALETTE[bg])
        examples.append(Example(
            id=f"glyphs-{i:05d}", image=np.asarray(img.resize((image_size,) * 2, Image.LANCZOS)),
            caption=f"a {fg} letter {letter} on a {bg} background"))
    return ImageDataset("glyphs", examples)


def _random_affine(img: Image.Image, rng: np.random.RandomState, fill: tuple[int, int, int]) -> Image.Image:
    """Rotation +-15 deg, scale 0.8-1.1, shear +-0.2, translation +-8% about the centre."""
    w, h = img.size
    angle = math.radians(rng.uniform(-15, 15))
    scale = rng.uniform(0.8, 1.1)
    shear = rng.uniform(-0.2, 0.2)
    tx, ty = rng.uniform(-0.08, 0.08, size=2) * w
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    # Inverse map (output -> input) as PIL expects, about the image centre.
    a, b = cos, sin + shear
    d, e = -sin, cos
    cx, cy = w / 2, h / 2
    c = cx - a * (cx + tx) - b * (cy + ty)
    f = cy - d * (cx + tx) - e * (cy + ty)
    return img.transform(img.size, Image.AFFINE, (a, b, c, d, e, f), resample=Image.BICUBIC,
                         fillcolor=fill)


def load_fill(image_size: int, num_examples: int | None, seed: int) -> ImageDataset:
    rng = np.random.RandomState(seed)
    canvas = 4 * image_size
    examples = []
    for i in range(num_examples or 1_000):
        fg, bg = _two_colours(rng)
        radius = rng.uniform(0.15, 0.35) * canvas
        cx, cy = rng.uniform(radius, canvas - radius, size=2)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        target = Image.new("RGB", (canvas, canvas), PALETTE[bg])
        ImageDraw.Draw(target).ellipse(box, fill=PALETTE[fg])
        condition = Image.new("RGB", (canvas, canvas), (0, 0, 0))
        ImageDraw.Draw(condition).ellipse(box, outline=(255, 255, 255), width=canvas // 32)
        size = (image_size,) * 2
        examples.append(Example(
            id=f"fill-{i:05d}", image=np.asarray(target.resize(size, Image.LANCZOS)),
            caption=f"a {fg} circle on a {bg} background",
            conditioning=np.asarray(condition.resize(size, Image.LANCZOS))))
    return ImageDataset("fill", examples)


BUILTIN_DATASETS: dict[str, Callable[[int, int | None, int], ImageDataset]] = {
    "digits": load_digits, "faces": load_faces, "glyphs": load_glyphs, "fill": load_fill,
    "identities": load_identities,
}
if tuple(BUILTIN_DATASETS) != BUILTIN_DATASET_NAMES:  # configs resolve every other name as a folder path
    raise ImportError("privdiff.config.BUILTIN_DATASET_NAMES and the built-in loaders disagree")
