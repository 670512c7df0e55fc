"""What a LoRA file's header gives away before anyone looks at its weights (weights-attack.md §9).

Trainers such as kohya sd-scripts write captions, tag counts, dataset folders, seeds and times into
the safetensors header. `inspect_file` reads the header by hand (no tensor is loaded), classifies
each key; `scrub_file` writes a copy whose tensor bytes are copied verbatim and whose metadata is
cut down to an allow-list.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from privdiff.errors import ModelError
from privdiff.runs.files import atomic_replace

MAX_HEADER_BYTES = 100 * 1024 * 1024
ADAPTER_CONFIG_KEY = "lora_adapter_metadata"

HIGH_KEYS = ("tag_frequency", "dataset_dirs", "datasets", "caption", "comment", "description", "prompt", "trigger")
MEDIUM_KEYS = ("num_", "_count", "count", "seed", "_at", "date", "time", "output_name", "model_name", "hash",
               "author", "title", "name", "epoch", "steps")
PATH_LIKE = re.compile(r"(^|[\s\"'=:])(/[\w.\-]+/|~/|[A-Za-z]:\\|\\\\|\./|\.\./)")
URL_LIKE = re.compile(r"\b(?:https?|ftp|s3|gs)://", re.IGNORECASE)
EMAIL_LIKE = re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.]+\b")


@dataclass
class Finding:
    key: str
    severity: str  # high | medium | low
    reason: str
    excerpt: str


# safetensors dtypes and their sizes in bytes (the format's own list).
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
               "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key '{duplicate[:60]}'")
    return dict(pairs)


def read_header(path: str | Path) -> tuple[dict, dict[str, str], int]:
    """(tensor table, __metadata__, header length) of a safetensors file, without reading tensors.

    The header is checked as strictly as the format defines it, so that no loader downstream ever
    sees a hostile one: a length within the file and the cap, UTF-8 JSON without duplicate keys, one
    entry per tensor with a known dtype, a non-negative integer shape and offsets whose span is that
    shape's size, the spans tiling the data section exactly (no gap, no overlap, nothing past the end).

    Raises:
        ModelError: the first problem found, in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ModelError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES:
            raise ModelError(f"{path}: header of {length} bytes exceeds the {MAX_HEADER_BYTES} byte limit")
        if 8 + length > size:
            raise ModelError(f"{path}: header length {length} runs past the end of the file")
        try:
            header = json.loads(fh.read(length).decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelError(f"{path}: the safetensors header is not valid JSON") from None
        except RecursionError:
            raise ModelError(f"{path}: the safetensors header is nested too deeply") from None
        except ValueError as err:
            raise ModelError(f"{path}: the safetensors header has a {err}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ModelError(f"{path}: __metadata__ must map strings to strings")
    _check_tensor_table(path, header, size - 8 - length)
    return header, metadata, length


def _check_tensor_table(path: Path, header: dict, data_bytes: int) -> None:
    spans = []
    for name, entry in header.items():
        label = f"{path}: tensor '{name[:60]}'"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ModelError(f"{label} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise ModelError(f"{label} has unknown dtype {str(dtype)[:20]!r}")
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 1 << 40 for d in shape)):
            raise ModelError(f"{label} has an invalid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise ModelError(f"{label} has invalid data offsets (outside the {data_bytes}-byte data section)")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise ModelError(f"{label}: its offsets span {offsets[1] - offsets[0]} bytes, its shape {shape} of "
                             f"{dtype} needs {math.prod(shape) * DTYPE_BYTES[dtype]}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else f"leaves a gap at byte {end}"
            raise ModelError(f"{path}: tensor '{name[:60]}' {what} (corrupt or crafted file)")
        end = stop
    if end != data_bytes:
        raise ModelError(f"{path}: the data section has {data_bytes} bytes, the tensors cover {end} (truncated "
                         f"or padded file)")


def allowed(key: str, drop_config: bool = False) -> bool:
    """The keys a shared adapter keeps: format, the LoRA config (unless dropped), privdiff's DP fields."""
    return key == "format" or key.startswith("privdiff.") or (key == ADAPTER_CONFIG_KEY and not drop_config)


def classify(key: str, value: str) -> Finding | None:
    """None for an allow-listed key; otherwise the finding with its severity and reason."""
    if allowed(key):
        return None
    lowered = key.lower()
    excerpt = value if len(value) <= 80 else value[:77] + "..."
    for pattern, what in ((PATH_LIKE, "a path"), (URL_LIKE, "a URL"), (EMAIL_LIKE, "an e-mail address")):
        if pattern.search(value):
            return Finding(key, "high", f"value contains {what}", excerpt)
    if any(word in lowered for word in HIGH_KEYS):
        return Finding(key, "high", "captions, tags, dataset folders or free text", excerpt)
    if any(word in lowered for word in MEDIUM_KEYS):
        return Finding(key, "medium", "counts, seeds, times or names", excerpt)
    return Finding(key, "low", "training setting", excerpt)


def inspect_file(path: str | Path) -> dict:
    """The findings of one file's header, JSON-ready; `leaks` is true for any high or medium finding."""
    header, metadata, _ = read_header(path)
    findings = [f for key, value in sorted(metadata.items()) if (f := classify(key, value)) is not None]
    return {"file": str(path), "tensors": len(header), "metadata_keys": len(metadata),
            "findings": [asdict(f) for f in findings],
            "leaks": any(f.severity in ("high", "medium") for f in findings)}


def scrub_file(source: str | Path, destination: str | Path, drop_config: bool = False) -> dict:
    """Writes `destination`: the same tensor bytes, metadata cut to the allow-list. Never in place."""
    source, destination = Path(source), Path(destination)
    if destination.resolve() == source.resolve():
        raise ModelError("scrub writes a new file: give an output path other than the input")
    header, metadata, length = read_header(source)
    kept = {k: v for k, v in metadata.items() if allowed(k, drop_config)}
    new_header = dict(header)
    if kept:
        new_header["__metadata__"] = kept
    encoded = json.dumps(new_header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header to 8 bytes with spaces

    def write(tmp: Path) -> None:
        with source.open("rb") as src, open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)) + encoded)
            src.seek(8 + length)
            while chunk := src.read(1 << 20):
                out.write(chunk)

    atomic_replace(destination, write)
    return {"file": str(destination), "kept": sorted(kept), "removed": sorted(set(metadata) - set(kept))}


__all__ = ["Finding", "MAX_HEADER_BYTES", "allowed", "classify", "inspect_file", "read_header", "scrub_file"]
