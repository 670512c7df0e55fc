"""What a LoRA file's header gives away before anyone looks at its weights (weights-attack spec §9).

Trainers such as kohya sd-scripts write captions, tag counts, dataset folders, seeds and times into
the safetensors header. `inspect_file` reads the header by hand (no tensor is loaded), classifies
each key; `scrub_file` writes a copy whose tensor bytes are copied verbatim and whose metadata is
cut down to an allow-list.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from privdiff.errors import ModelError

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


def read_header(path: str | Path) -> tuple[dict, dict[str, str], int]:
    """(tensor table, __metadata__, header length) of a safetensors file, without reading tensors."""
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
            header = json.loads(fh.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelError(f"{path}: the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ModelError(f"{path}: __metadata__ must map strings to strings")
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= size - 8 - length):
            raise ModelError(f"{path}: tensor '{name[:60]}' has invalid data offsets")
    return header, metadata, length


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
    from privdiff.training.checkpoint import atomic_replace

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
