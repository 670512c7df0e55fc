"""Synthetic identities: procedurally drawn faces, one fixed parameter vector per identity.

An identity is an integer seed; `identity_params` turns it into a face (head shape, skin, hair,
eyes, brows, nose, mouth, accessory, background) and `render_identity` draws image `index` of it
with per-image jitter (pose, scale, brightness, expression, pixel noise). Everything is a pure
function of (identity, index), so any image can be re-rendered anywhere (weights-attack.md §3).

Identity seeds come in disjoint pools: `base` pre-trains the face base model, `embedding` trains
the identity-embedding model, `attack` is split by identity into shadow and victim identities.
"""

from __future__ import annotations

import colorsys
import math
import string
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from privdiff.data.examples import Example, ImageDataset, pick_subset
from privdiff.data.vocabulary import CAPTION_WORDS
from privdiff.errors import DataError
from privdiff.seeding import numpy_rng

Colour = tuple[int, int, int]

HAIR_STYLES = ("bald", "short", "long", "bun", "mohawk", "afro", "side")
ACCESSORIES = ("none", "glasses", "hat")
POOL_SIZES = {"base": 300, "embedding": 300, "attack": 900}
POOL_OFFSETS = {"base": 100_000, "embedding": 200_000, "attack": 300_000}
SHADOW_FRACTION = 0.8
BASE_RENDERS = 20  # renders per base identity in the built-in dataset
CAPTION = "a face"


@dataclass(frozen=True)
class IdentityParams:
    """The fixed look of one identity; lengths are fractions of the head's radii.

    Attributes:
        head_aspect: head ellipse width / height.
        skin: skin colour.
        hair_colour: hair (and brow) colour.
        hair_style: one of `HAIR_STYLES`.
        eye_colour: iris colour.
        eye_size: eye radius / head half-width.
        eye_spacing: distance of each eye from the midline / head half-width.
        brow_tilt: brow angle in degrees (positive: inner ends lower, a frown).
        nose_length: nose length / head half-height.
        mouth_width: mouth half-width / head half-width.
        mouth_curvature: in [-1, 1], positive is a smile (each render adds expression jitter).
        accessory: one of `ACCESSORIES`.
        accessory_colour: glasses frame or hat colour (drawn only with an accessory).
        background_hue: hue of the plain background in [0, 1).
        background_saturation: its saturation.
    """

    head_aspect: float
    skin: Colour
    hair_colour: Colour
    hair_style: str
    eye_colour: Colour
    eye_size: float
    eye_spacing: float
    brow_tilt: float
    nose_length: float
    mouth_width: float
    mouth_curvature: float
    accessory: str
    accessory_colour: Colour
    background_hue: float
    background_saturation: float


def _hsv(h: float, s: float, v: float) -> Colour:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def _hair_colour(rng: np.random.Generator) -> Colour:
    kind = rng.random()
    if kind < 0.6:  # natural: black, browns, auburn, blond
        return _hsv(rng.uniform(0.02, 0.13), rng.uniform(0.3, 0.85), rng.uniform(0.06, 0.9))
    if kind < 0.75:  # grey to white
        return _hsv(0.0, 0.0, rng.uniform(0.45, 0.97))
    return _hsv(rng.random(), rng.uniform(0.5, 0.95), rng.uniform(0.45, 0.95))  # dyed


@lru_cache(maxsize=4096)
def identity_params(identity: int) -> IdentityParams:
    """The parameter vector of `identity`, a pure function of the seed (wide ranges, so that
    identities stay apart at 32x32)."""
    rng = numpy_rng(identity, "identity-params")
    tone = rng.random()  # dark to light skin, with a slight warm/cool tint
    skin = tuple(int(np.clip(d + tone * (l - d) + rng.normal(0, 8), 0, 255))
                 for d, l in zip((80, 50, 35), (250, 222, 198)))
    return IdentityParams(
        head_aspect=float(rng.uniform(0.68, 1.02)),
        skin=skin,
        hair_colour=_hair_colour(rng),
        hair_style=HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))],
        eye_colour=_hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.15, 0.6)),
        eye_size=float(rng.uniform(0.1, 0.2)),
        eye_spacing=float(rng.uniform(0.3, 0.55)),
        brow_tilt=float(rng.uniform(-25, 25)),
        nose_length=float(rng.uniform(0.15, 0.45)),
        mouth_width=float(rng.uniform(0.22, 0.6)),
        mouth_curvature=float(rng.uniform(-1, 1)),
        accessory=ACCESSORIES[int(rng.choice(3, p=(0.5, 0.25, 0.25)))],
        accessory_colour=_hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.3, 0.95)),
        background_hue=float(rng.random()),
        background_saturation=float(rng.uniform(0.2, 0.75)),
    )


def _darker(colour: Colour, factor: float) -> Colour:
    return tuple(round(c * factor) for c in colour)


def _draw_hair_back(draw: ImageDraw.ImageDraw, p: IdentityParams, cx: float, cy: float, rx: float,
                    ry: float) -> None:
    """Hair that sits behind the head (long hair, afro)."""
    if p.hair_style == "long":
        draw.rounded_rectangle((cx - 1.18 * rx, cy - 1.08 * ry, cx + 1.18 * rx, cy + 1.15 * ry),
                               radius=rx, fill=p.hair_colour)
    elif p.hair_style == "afro":
        draw.ellipse((cx - 1.45 * rx, cy - 1.4 * ry, cx + 1.45 * rx, cy + 0.6 * ry), fill=p.hair_colour)


def _draw_hair_front(draw: ImageDraw.ImageDraw, p: IdentityParams, cx: float, cy: float, rx: float,
                     ry: float) -> None:
    """Hair drawn over the top of the head."""
    if p.hair_style in ("bald", "afro"):
        return
    cap = (cx - 1.07 * rx, cy - 1.1 * ry, cx + 1.07 * rx, cy + 0.75 * ry)
    if p.hair_style == "mohawk":
        w = 0.28 * rx
        draw.polygon([(cx - w, cy - 0.7 * ry), (cx - w, cy - 1.2 * ry), (cx, cy - 1.45 * ry),
                      (cx + w, cy - 1.2 * ry), (cx + w, cy - 0.7 * ry)], fill=p.hair_colour)
        return
    draw.chord(cap, 190, 350, fill=p.hair_colour)
    if p.hair_style == "bun":
        r = 0.42 * rx
        draw.ellipse((cx - r, cy - 1.05 * ry - 1.6 * r, cx + r, cy - 1.05 * ry + 0.4 * r), fill=p.hair_colour)
    elif p.hair_style == "side":  # a fringe swept across one side of the forehead
        draw.polygon([(cx - 1.0 * rx, cy - 0.6 * ry), (cx + 0.5 * rx, cy - 0.95 * ry),
                      (cx - 0.1 * rx, cy - 0.3 * ry), (cx - 0.95 * rx, cy - 0.05 * ry)], fill=p.hair_colour)


def _draw_face(draw: ImageDraw.ImageDraw, p: IdentityParams, canvas: int, expression: float) -> None:
    cx, cy = canvas / 2, 0.55 * canvas
    ry = 0.3 * canvas
    rx = ry * p.head_aspect
    unit = canvas / 128  # line widths were tuned on a 128 px canvas
    _draw_hair_back(draw, p, cx, cy, rx, ry)
    draw.rectangle((cx - 0.42 * rx, cy + 0.6 * ry, cx + 0.42 * rx, canvas), fill=_darker(p.skin, 0.85))  # neck
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=p.skin)
    _draw_hair_front(draw, p, cx, cy, rx, ry)
    # Eyes: white, then the iris.
    eye_y, e = cy - 0.12 * ry, p.eye_size * rx
    eye_xs = (cx - p.eye_spacing * rx, cx + p.eye_spacing * rx)
    for x in eye_xs:
        draw.ellipse((x - e, eye_y - 0.75 * e, x + e, eye_y + 0.75 * e), fill=(245, 245, 240))
        draw.ellipse((x - 0.6 * e, eye_y - 0.6 * e, x + 0.6 * e, eye_y + 0.6 * e), fill=p.eye_colour)
    # Brows, mirrored: the tilt lowers (positive) or raises the inner ends.
    brow = p.hair_colour if p.hair_style != "bald" else _darker(p.skin, 0.45)
    half, dy = 1.1 * e, 1.1 * e * math.tan(math.radians(p.brow_tilt))
    for x, side in zip(eye_xs, (-1, 1)):
        inner, outer = x - side * half, x + side * half
        draw.line((outer, eye_y - 1.9 * e - dy, inner, eye_y - 1.9 * e + dy), fill=brow, width=round(4 * unit))
    top = eye_y + 0.4 * e
    draw.line((cx, top, cx + 0.08 * rx, top + p.nose_length * ry), fill=_darker(p.skin, 0.65),
              width=round(4 * unit))
    # Mouth: a parabola, corners raised for a smile.
    curve = float(np.clip(p.mouth_curvature + expression, -1, 1)) * 0.16 * ry
    mouth_y, hw = cy + 0.52 * ry, p.mouth_width * rx
    points = [(cx + u * hw, mouth_y + curve * (1 - u * u) - curve / 2) for u in np.linspace(-1, 1, 9)]
    draw.line(points, fill=(140, 30, 45), width=round(5 * unit), joint="curve")
    if p.accessory == "glasses":
        r = 1.8 * e
        for x in eye_xs:
            draw.ellipse((x - r, eye_y - 0.8 * r, x + r, eye_y + 0.8 * r), outline=p.accessory_colour,
                         width=round(4 * unit))
        draw.line((eye_xs[0] + r, eye_y, eye_xs[1] - r, eye_y), fill=p.accessory_colour, width=round(4 * unit))
    elif p.accessory == "hat":
        draw.rectangle((cx - 0.85 * rx, cy - 1.5 * ry, cx + 0.85 * rx, cy - 0.62 * ry), fill=p.accessory_colour)
        draw.rectangle((cx - 1.35 * rx, cy - 0.72 * ry, cx + 1.35 * rx, cy - 0.56 * ry),
                       fill=_darker(p.accessory_colour, 0.7))


def _jitter(img: Image.Image, rng: np.random.Generator, size: int, fill: Colour) -> Image.Image:
    """Rotation +-8 deg, scale +-6 %, translation +-2 output pixels, about the centre."""
    w, h = img.size
    angle = math.radians(rng.uniform(-8, 8))
    scale = rng.uniform(0.94, 1.06)
    tx, ty = rng.uniform(-2, 2, size=2) * w / size
    # Inverse map (output -> input) as PIL expects.
    a, b = math.cos(angle) / scale, math.sin(angle) / scale
    d, e = -b, a
    cx, cy = w / 2, h / 2
    c = cx - a * (cx + tx) - b * (cy + ty)
    f = cy - d * (cx + tx) - e * (cy + ty)
    return img.transform(img.size, Image.AFFINE, (a, b, c, d, e, f), resample=Image.BILINEAR, fillcolor=fill)


def render_identity(identity: int, index: int, size: int = 32,
                    background: tuple[float, float] | None = None) -> np.ndarray:
    """Image `index` of `identity`: (size, size, 3) uint8, a pure function of (identity, index).

    Drawn at 4x with PIL, jittered (pose, scale, expression), downsampled with LANCZOS, then
    brightness +-10 % and Gaussian pixel noise (sigma 0.02 of the range) are applied.

    Args:
        background: (hue, saturation) replacing the identity's own background (an augmentation
            that makes the identity embedder look at the face); None keeps the identity's.
    """
    p = identity_params(identity)
    rng = numpy_rng(identity, "render", index)
    canvas = 4 * size
    hue, saturation = background or (p.background_hue, p.background_saturation)
    background_colour = _hsv(hue, saturation, 0.85)
    img = Image.new("RGB", (canvas, canvas), background_colour)
    _draw_face(ImageDraw.Draw(img), p, canvas, expression=float(rng.uniform(-0.35, 0.35)))
    img = _jitter(img, rng, size, background_colour).resize((size, size), Image.LANCZOS)
    pixels = np.asarray(img, dtype=np.float32) / 255.0 * rng.uniform(0.9, 1.1)
    pixels += rng.normal(0.0, 0.02, pixels.shape)
    return np.clip(pixels * 255.0, 0, 255).round().astype(np.uint8)


def identity_images(identity: int, count: int, start: int = 0, size: int = 32) -> np.ndarray:
    """Renders `start .. start + count - 1` of `identity`: (count, size, size, 3) uint8."""
    return np.stack([render_identity(identity, i, size) for i in range(start, start + count)])


def pool_identities(pool: str) -> list[int]:
    """The identity seeds of a pool (`base`, `embedding` or `attack`); pools are disjoint."""
    if pool not in POOL_SIZES:
        raise DataError(f"unknown identity pool '{pool}': use one of {', '.join(POOL_SIZES)}")
    return [POOL_OFFSETS[pool] + i for i in range(POOL_SIZES[pool])]


def attack_split() -> tuple[list[int], list[int]]:
    """The attack pool split by identity: (shadow identities, held-out victim identities)."""
    attack = pool_identities("attack")
    cut = round(SHADOW_FRACTION * len(attack))
    return attack[:cut], attack[cut:]


def _draw_word(identity: int, salt: int) -> str:
    rng = numpy_rng(identity, "trigger-word", salt)
    letters = rng.integers(0, 26, size=int(rng.integers(4, 12)))
    return "".join(string.ascii_lowercase[i] for i in letters)


@lru_cache(maxsize=1)
def _pool_trigger_words() -> dict[int, str]:
    """Trigger words of every pool identity, collisions redrawn (with a salt) in pool order."""
    words: dict[int, str] = {}
    taken = set(CAPTION_WORDS)
    for pool in POOL_SIZES:
        for identity in pool_identities(pool):
            salt = 0
            while (word := _draw_word(identity, salt)) in taken:
                salt += 1
            words[identity] = word
            taken.add(word)
    return words


def trigger_word(identity: int) -> str:
    """The secret trigger word of `identity`: 4-11 lowercase letters, unique over all pool
    identities and never a word of the built-in captions."""
    table = _pool_trigger_words()
    if identity in table:
        return table[identity]
    taken = set(CAPTION_WORDS) | set(table.values())
    salt = 0
    while (word := _draw_word(identity, salt)) in taken:
        salt += 1
    return word


def load_identities(image_size: int, num_examples: int | None, seed: int) -> ImageDataset:
    """The `identities` built-in: renders of the base pool captioned "a face" (all 300 x 20 when
    `num_examples` is None, else a seeded subset of them)."""

    grid = [(identity, index) for identity in pool_identities("base") for index in range(BASE_RENDERS)]
    examples = [Example(id=f"identities-{identity}-{index}", image=render_identity(identity, index, image_size),
                        caption=CAPTION)
                for identity, index in (grid[i] for i in pick_subset(len(grid), num_examples, seed))]
    return ImageDataset("identities", examples)
