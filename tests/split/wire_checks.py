"""What must never cross the wire (split-controlnet.md §13 item 5), checked on actual bytes.

For every private example we build the byte strings it could leak as: the prompt text, its token
ids (int64 and int32), and the image and the condition as uint8, and as float16/float32/float64
in [0, 1] and in [-1, 1], each in HWC and CHW order. A payload leaks if it contains any of them.
Decoded tensors are also compared numerically with every image/condition of the same size, in
any reshape (a lossy dtype round trip defeats a byte search but not this).
"""

from __future__ import annotations

import numpy as np

from privdiff.data.examples import ImageDataset

CORE = ("image/hwc/uint8", "image/chw/pm1/<f4", "image/chw/pm1/<f2", "condition/hwc/uint8",
        "condition/chw/01/<f4", "condition/chw/01/<f2", "condition/chw/pm1/<f4")


def secret_byte_strings(dataset: ImageDataset, tokenizer, core_only: bool = False) -> list[tuple[str, bytes]]:
    """`core_only`: the prompt, int64 token ids and the likeliest tensor layouts only (for large
    captures, where each search costs milliseconds)."""
    out: list[tuple[str, bytes]] = []
    for ex in dataset.examples:
        out.append((f"{ex.id}/prompt", ex.caption.encode()))
        ids = np.array(tokenizer(ex.caption, truncation=True).input_ids)
        for dtype in ("<i8", "<i4"):
            out.append((f"{ex.id}/token_ids/{dtype}", ids.astype(dtype).tobytes()))
        for kind, image in (("image", ex.image), ("condition", ex.conditioning)):
            for layout, array in (("hwc", image), ("chw", np.ascontiguousarray(image.transpose(2, 0, 1)))):
                out.append((f"{ex.id}/{kind}/{layout}/uint8", array.astype(np.uint8).tobytes()))
                unit = array.astype(np.float64) / 255.0
                for scale_name, scaled in (("01", unit), ("pm1", unit * 2 - 1)):
                    for dtype in ("<f2", "<f4", "<f8"):
                        out.append((f"{ex.id}/{kind}/{layout}/{scale_name}/{dtype}", scaled.astype(dtype).tobytes()))
    if core_only:
        out = [(n, b) for n, b in out if n.endswith(("/prompt", "/<i8")) or n.split("/", 1)[1] in CORE]
    return out


def byte_leaks(payload: bytes, secrets: list[tuple[str, bytes]]) -> list[str]:
    return [name for name, secret in secrets if len(secret) >= 8 and secret in payload]


def numeric_leaks(tensors: dict[str, np.ndarray], dataset: ImageDataset, atol: float = 2e-3) -> list[str]:
    """Any contiguous run of a tensor's flattened values that equals an image/condition (rescaled)."""
    references = []
    for ex in dataset.examples:
        for kind, image in (("image", ex.image), ("condition", ex.conditioning)):
            unit = image.astype(np.float64) / 255.0
            for layout, array in (("hwc", unit), ("chw", unit.transpose(2, 0, 1))):
                flat = array.reshape(-1)
                references += [(f"{ex.id}/{kind}/{layout}/01", flat), (f"{ex.id}/{kind}/{layout}/pm1", flat * 2 - 1),
                               (f"{ex.id}/{kind}/{layout}/255", flat * 255)]
    leaks = []
    for name, tensor in tensors.items():
        values = np.asarray(tensor, dtype=np.float64).reshape(-1)
        for ref_name, ref in references:
            n = ref.size
            if values.size < n:
                continue
            windows = values[: values.size // n * n].reshape(-1, n)
            if np.any(np.all(np.abs(windows - ref) <= atol * max(1.0, np.abs(ref).max()), axis=1)):
                leaks.append(f"{name}~{ref_name}")
    return leaks
