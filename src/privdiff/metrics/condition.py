"""Condition fidelity of ControlNet outputs: edge SSIM, and disk IoU and colours for `fill`.

Evaluation evaluation.md §8: the edges re-extracted from a generated image (luma, Sobel magnitude normalised
by its maximum, Otsu threshold; Canny 100/200 on request) are compared by SSIM with the binarised
input condition. For the `fill` dataset (white circle outline on black -> filled coloured circle)
the disk interior is recovered from the condition alone, so generated images can also be scored by
disk IoU and by the colours the caption asked for.

Images are uint8 in [0, 255] or float in [0, 1], one (H, W, 3) or a batch (N, H, W, 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage.filters import sobel, threshold_otsu
from skimage.metrics import structural_similarity

from privdiff.data.builtin import PALETTE
from privdiff.errors import ConfigError
from privdiff.metrics.estimate import Estimate
from privdiff.metrics.intervals import clopper_pearson, mean_interval
from privdiff.metrics.labels import CAPTION_LABELS

__all__ = ["EDGE_METHODS", "binarize_condition", "colour_accuracy", "condition_fidelity", "disk_iou",
           "disk_mask", "edge_map", "edge_ssim", "luma", "nearest_palette_colour", "ssim_window"]

EDGE_METHODS = ("sobel", "canny")
_LUMA_601 = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601
_PALETTE_NAMES = sorted(PALETTE)
_PALETTE_RGB = np.array([PALETTE[name] for name in _PALETTE_NAMES], dtype=np.float64)  # (K, 3)

Colour = str | Sequence[float]


def _as_float(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] or float [0, 1] -> float64 [0, 1], same shape."""
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float64) / 255.0
    return image.astype(np.float64)


def _check_rgb(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise ValueError(f"{name}: expected (H, W, 3) or (N, H, W, 3), got shape {image.shape}")
    return image


def luma(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma in [0, 1]: (..., H, W, 3) -> (..., H, W)."""
    return _as_float(_check_rgb(image, "image")) @ _LUMA_601


def _sobel_otsu(gray: np.ndarray) -> np.ndarray:
    """(H, W) luma -> (H, W) {0, 1}: Sobel magnitude / its maximum, then Otsu."""
    magnitude = sobel(gray)
    peak = magnitude.max()
    if peak <= 0:  # a flat image has no edges (and Otsu has nothing to split)
        return np.zeros_like(gray)
    magnitude = magnitude / peak
    return (magnitude > threshold_otsu(magnitude)).astype(np.float64)


def _canny(gray: np.ndarray) -> np.ndarray:
    try:
        import cv2
    except ImportError:
        raise ConfigError("edges 'canny' needs OpenCV (pip install opencv-python-headless); "
                          "use the default 'sobel'") from None
    u8 = np.clip(gray * 255.0, 0, 255).round().astype(np.uint8)
    return (cv2.Canny(u8, 100, 200) > 0).astype(np.float64)  # thresholds of the split-ControlNet reference


def edge_map(image: np.ndarray, method: str = "sobel") -> np.ndarray:
    """Binary edge map of an image (evaluation.md §8, step 1).

    Args:
        image: (H, W, 3) or (N, H, W, 3), uint8 or float in [0, 1].
        method: "sobel" (Sobel magnitude normalised by its maximum, Otsu threshold) or "canny"
            (OpenCV Canny 100/200; needs cv2).

    Returns:
        (H, W) or (N, H, W) float64 map with values in {0, 1}; all zero for a flat image.

    Raises:
        ConfigError: for an unknown method, or "canny" without OpenCV installed.
    """
    if method not in EDGE_METHODS:
        raise ConfigError(f"unknown edge method {method!r}; choose one of {', '.join(EDGE_METHODS)}")
    gray = luma(image)  # (..., H, W)
    one = _sobel_otsu if method == "sobel" else _canny
    if gray.ndim == 2:
        return one(gray)
    return np.stack([one(g) for g in gray])


def binarize_condition(condition: np.ndarray) -> np.ndarray:
    """Input condition (white outline on black) -> (H, W) or (N, H, W) float {0, 1}, luma >= 0.5."""
    return (luma(condition) >= 0.5).astype(np.float64)


def ssim_window(height: int, width: int) -> int:
    """SSIM window side: 7 below 64 px, 11 from 64 px (evaluation.md §8)."""
    return 7 if min(height, width) < 64 else 11


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    # With gaussian_weights, skimage (0.26) always filters with an 11-tap sigma-1.5 Gaussian (it
    # fixes truncate at 3.5); win_size only sets the border strip left out of the mean.
    return float(structural_similarity(a, b, gaussian_weights=True, sigma=1.5, win_size=ssim_window(*a.shape),
                                       data_range=1.0, use_sample_covariance=False))


def edge_ssim(generated: np.ndarray, condition: np.ndarray, method: str = "sobel") -> float | np.ndarray:
    """SSIM between the edges of the generated image and the binarised condition (evaluation.md §8, step 2).

    Args:
        generated: (H, W, 3) or (N, H, W, 3) generated image(s).
        condition: the input condition(s), same shape.
        method: edge extractor, see `edge_map`.

    Returns:
        A float for one image, an (N,) float64 array for a batch.
    """
    generated, condition = _check_rgb(generated, "generated"), _check_rgb(condition, "condition")
    if generated.shape != condition.shape:
        raise ValueError(f"generated {generated.shape} and condition {condition.shape} differ in shape")
    edges, target = edge_map(generated, method), binarize_condition(condition)
    if edges.ndim == 2:
        return _ssim(edges, target)
    return np.array([_ssim(e, t) for e, t in zip(edges, target)])


def disk_mask(condition: np.ndarray) -> np.ndarray:
    """The true disk interior of a `fill` condition: its binarised outline with the holes filled.

    Args:
        condition: (H, W, 3) condition image (white circle outline on black), or an (H, W) mask,
            which is returned as bool unchanged.

    Returns:
        (H, W) bool mask, outline included (the outline is drawn just inside the disk's edge).
    """
    condition = np.asarray(condition)
    if condition.ndim == 2:
        return condition.astype(bool)
    if condition.ndim != 3 or condition.shape[-1] != 3:
        raise ValueError(f"condition: expected (H, W, 3) or an (H, W) mask, got shape {condition.shape}")
    return ndimage.binary_fill_holes(binarize_condition(condition) > 0)


def _rgb(colour: Colour) -> np.ndarray:
    """A PALETTE name or an RGB triple in [0, 255] -> (3,) float64."""
    if isinstance(colour, str):
        if colour not in PALETTE:
            raise ValueError(f"unknown colour {colour!r}; known: {', '.join(_PALETTE_NAMES)}")
        return np.array(PALETTE[colour], dtype=np.float64)
    rgb = np.asarray(colour, dtype=np.float64)
    if rgb.shape != (3,):
        raise ValueError(f"expected an RGB triple, got {colour!r}")
    return rgb


def disk_iou(generated: np.ndarray, condition_or_disk_mask: np.ndarray, circle_rgb: Colour,
             background_rgb: Colour) -> float:
    """IoU of the pixels coloured like the circle with the true disk interior (`fill`, evaluation.md §8).

    Args:
        generated: (H, W, 3) generated image, uint8 or float in [0, 1].
        condition_or_disk_mask: the (H, W, 3) condition image, or an (H, W) disk mask.
        circle_rgb: the prompt's circle colour, a PALETTE name or RGB in [0, 255].
        background_rgb: the prompt's background colour, likewise.

    Returns:
        |pred & disk| / |pred | disk|, where pred marks pixels strictly closer (Euclidean RGB) to the
        circle colour than to the background colour; 1.0 when both sets are empty.
    """
    image = _as_float(_check_rgb(generated, "generated")) * 255.0  # (H, W, 3), palette scale
    if image.ndim != 3:
        raise ValueError("disk_iou scores one image; loop over a batch")
    disk = disk_mask(condition_or_disk_mask)
    if disk.shape != image.shape[:2]:
        raise ValueError(f"disk mask {disk.shape} does not match the image {image.shape[:2]}")
    to_circle = np.linalg.norm(image - _rgb(circle_rgb), axis=-1)  # (H, W)
    to_background = np.linalg.norm(image - _rgb(background_rgb), axis=-1)
    pred = to_circle < to_background
    union = np.count_nonzero(pred | disk)
    return 1.0 if union == 0 else np.count_nonzero(pred & disk) / union


def nearest_palette_colour(rgb: Sequence[float]) -> str:
    """Name of the PALETTE colour nearest (Euclidean) to an RGB triple in [0, 255]."""
    distances = np.linalg.norm(_PALETTE_RGB - np.asarray(rgb, dtype=np.float64), axis=1)  # (K,)
    return _PALETTE_NAMES[int(distances.argmin())]


def colour_accuracy(generated: np.ndarray, disk_mask_or_condition: np.ndarray, circle_name: str,
                    background_name: str) -> tuple[bool, bool]:
    """Whether the median colours inside and outside the disk are the prompt's (`fill`, evaluation.md §8).

    Args:
        generated: (H, W, 3) generated image, uint8 or float in [0, 1].
        disk_mask_or_condition: an (H, W) disk mask, or the (H, W, 3) condition image.
        circle_name: the prompt's circle colour (a PALETTE name).
        background_name: the prompt's background colour.

    Returns:
        (circle_correct, background_correct); a region without pixels counts as wrong.
    """
    image = _as_float(_check_rgb(generated, "generated")) * 255.0  # (H, W, 3)
    if image.ndim != 3:
        raise ValueError("colour_accuracy scores one image; loop over a batch")
    disk = disk_mask(disk_mask_or_condition)
    if disk.shape != image.shape[:2]:
        raise ValueError(f"disk mask {disk.shape} does not match the image {image.shape[:2]}")
    results = []
    for region, name in ((disk, circle_name), (~disk, background_name)):
        pixels = image[region]  # (P, 3)
        # The per-channel median ignores the anti-aliased rim that a mean would blend in.
        results.append(len(pixels) > 0 and nearest_palette_colour(np.median(pixels, axis=0)) == name)
    return results[0], results[1]


def _summary(values: np.ndarray, *, seed: int, bootstrap: int, key: str) -> dict:
    values = np.asarray(values, dtype=np.float64)
    lo, hi = mean_interval(values, resamples=bootstrap, seed=seed, key=key)
    return Estimate(float(values.mean()), lo, hi).to_json()  # the record states n


def _fill_colours(caption: str) -> tuple[str, str] | None:
    match = CAPTION_LABELS["fill"][0].match(caption)
    if match is None or match["circle"] not in PALETTE or match["background"] not in PALETTE:
        return None
    return match["circle"], match["background"]


def condition_fidelity(generated: np.ndarray, conditions: np.ndarray, captions: Sequence[str] | None = None,
                       *, seed: int = 0, bootstrap: int = 200, method: str = "sobel") -> dict:
    """Per-image condition-fidelity scores and their means with 95 % intervals.

    Args:
        generated: (N, H, W, 3) generated images, uint8 or float in [0, 1].
        conditions: (N, H, W, 3) input conditions, same shape.
        captions: the N prompts; images whose caption reads "a {circle} circle on a {background}
            background" (the `fill` dataset) are also scored by disk IoU and colour accuracy.
        seed: bootstrap seed.
        bootstrap: number of bootstrap resamples for the mean intervals.
        method: edge extractor, see `edge_map`.

    Returns:
        JSON-friendly dict: "n"; "edge_ssim" with "value" (mean), "ci" (bootstrap 95 %) and
        "per_image". When some captions are `fill` captions, also "disk_iou" (likewise, per_image is
        null for the other images) and "colour_accuracy" ("value" is the fraction with both colours
        right, "ci" its Clopper-Pearson interval, plus per-image "circle_correct" and
        "background_correct", and the separate "circle"/"background" fractions), each with "n".
    """
    generated, conditions = _check_rgb(generated, "generated"), _check_rgb(conditions, "conditions")
    if generated.ndim != 4 or generated.shape != conditions.shape or len(generated) == 0:
        raise ValueError(f"expected two equal non-empty (N, H, W, 3) batches, got {generated.shape} "
                         f"and {conditions.shape}")
    n = len(generated)
    if captions is not None and len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} images")

    ssim = edge_ssim(generated, conditions, method)  # (N,)
    out: dict = {"n": n, "edge_method": method,
                 "edge_ssim": {**_summary(ssim, seed=seed, bootstrap=bootstrap, key="edge_ssim"),
                               "per_image": ssim.tolist()}}

    colours = [_fill_colours(c) for c in captions] if captions is not None else [None] * n
    scored = [i for i, c in enumerate(colours) if c is not None]
    if not scored:
        return out
    ious: list[float | None] = [None] * n
    circle_ok: list[bool | None] = [None] * n
    background_ok: list[bool | None] = [None] * n
    for i in scored:
        circle, background = colours[i]
        disk = disk_mask(conditions[i])  # once per image, shared by both fill metrics
        ious[i] = float(disk_iou(generated[i], disk, circle, background))
        circle_ok[i], background_ok[i] = colour_accuracy(generated[i], disk, circle, background)
    iou_values = np.array([ious[i] for i in scored])
    both = sum(circle_ok[i] and background_ok[i] for i in scored)
    out["disk_iou"] = {**_summary(iou_values, seed=seed, bootstrap=bootstrap, key="disk_iou"),
                       "n": len(scored), "per_image": ious}
    out["colour_accuracy"] = {
        "value": both / len(scored), "ci": list(clopper_pearson(both, len(scored))), "n": len(scored),
        "circle": sum(circle_ok[i] for i in scored) / len(scored),
        "background": sum(background_ok[i] for i in scored) / len(scored),
        "circle_correct": circle_ok, "background_correct": background_ok}
    return out
