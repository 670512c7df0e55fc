"""Encoder outputs cached on disk, one row per distinct input, shared by every command.

A row's key is the sha256 of the exact input the frozen encoder sees (an image's pixels and size, a
caption's token ids); rows live in folders named by the encoder (`encoder_key`: its weights, the
batch size it runs at, the device and library versions, this format's version). So any subset of any
dataset hits the rows an earlier command wrote: fine-tuning's members, the audit's four roles, each
LiRA shadow's half, early stopping's non-members. A changed image, caption, resolution or encoder
is a different key and misses.

A file (a "shard") holds the rows one call encoded, with their keys and a sha256 of their bytes in
its safetensors metadata, and is named by the hash of its keys. It is written to a temporary file
and renamed, so concurrent writers (torchrun ranks) never leave a partial file, and two writers of
the same rows write the same file. A shard that fails any check on reading (unreadable, truncated,
checksum, keys, shape or dtype) is reported in one warning line, removed, and its rows encoded again:
a damaged entry is never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import diffusers
import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from privdiff.runs.files import atomic_replace

CACHE_ENV = "PRIVDIFF_CACHE"
FORMAT = "privdiff-encodings/1"  # bump when what a row holds changes (the scaling, the padding rule)
ROWS = "rows"  # the one tensor of a shard
# What reading a damaged shard raises: safetensors' own error (bad header, truncated data), JSON and
# metadata errors, an OS error other than a vanished file.
DAMAGE = (SafetensorError, OSError, ValueError, KeyError, TypeError)

log = logging.getLogger("privdiff.cache")


def default_cache_root() -> Path:
    """$PRIVDIFF_CACHE, else $XDG_CACHE_HOME/privdiff/encodings, else ~/.cache/privdiff/encodings."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "privdiff" / "encodings"


def sha256_hex(*parts: bytes | str) -> str:
    """sha256 of `parts`, each length-prefixed (so that no two lists of parts collide)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of `tensor` (any dtype), C order, on the CPU."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


_WEIGHT_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of `module`'s state (names, dtypes, shapes, values), memoised per module while its
    tensors stay the same objects, unmodified in place (their storage and version counters)."""
    state = module.state_dict()
    stamp = tuple((name, t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for name, t in sorted(state.items()))
    known = _WEIGHT_DIGESTS.get(module)
    if known is not None and known[0] == stamp:
        return known[1]
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in sorted(state.items()):
        h.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        h.update(tensor_bytes(tensor))
    _WEIGHT_DIGESTS[module] = (stamp, h.hexdigest())
    return h.hexdigest()


def device_description(device: torch.device) -> str:
    """What decides an encoder's floating-point results besides its inputs: the device (GPU model,
    or CPU instruction set) and the library versions."""
    if device.type == "cuda":
        where = f"cuda:{torch.cuda.get_device_name(device)}:{torch.version.cuda}:{torch.backends.cudnn.version()}"
    else:
        where = f"{device.type}:{torch.backends.cpu.get_cpu_capability()}"
    return f"{where} torch {torch.__version__} diffusers {diffusers.__version__} transformers {transformers.__version__}"


def encoder_key(kind: str, module: torch.nn.Module, *settings: object) -> str:
    """The folder name of one encoder's rows: `kind`, its weights, `settings` (e.g. the VAE's scaling
    factor and the batch size) and the device it runs on."""
    device = next(module.parameters()).device
    return f"{kind}-" + sha256_hex(FORMAT, kind, weights_digest(module), repr(settings),
                                   device_description(device))[:32]


class CacheEntryError(Exception):
    """A shard that may not be used (its reason is the message)."""


class EncodingCache:
    """Encoder rows by content key, on disk under `root` (or in memory only, `root=None`: --no-cache).

    Rows read or encoded are also kept in memory for the life of the object, so that one command
    encoding several subsets of a dataset reads each file once.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = None if root is None else Path(root)
        self._rows: dict[tuple[str, str], torch.Tensor] = {}

    def rows(self, encoder: str, keys: Sequence[str], row_shape: tuple[int, ...], dtype: torch.dtype,
             encode: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """(N, *row_shape) rows for `keys`: cached ones are read, the others encoded and stored.

        Args:
            encoder: `encoder_key` of the encoder that makes the rows.
            keys: per row, the hash of its input (rows with equal keys are encoded once).
            row_shape, dtype: what every row must be; a stored shard that disagrees is rebuilt.
            encode: positions (into `keys`) -> (len(positions), *row_shape) rows, on any device.
        """
        wanted = [k for k in dict.fromkeys(keys) if (encoder, k) not in self._rows]
        if wanted and self.root is not None:
            self._read(encoder, set(wanted), tuple(row_shape), dtype)
        missing = [k for k in wanted if (encoder, k) not in self._rows]
        if missing:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            fresh = encode([first[k] for k in missing]).detach().cpu().contiguous()
            if tuple(fresh.shape) != (len(missing), *row_shape) or fresh.dtype != dtype:
                raise RuntimeError(f"encoder {encoder} returned {tuple(fresh.shape)} {fresh.dtype}, "
                                   f"expected {(len(missing), *row_shape)} {dtype}")
            self._keep(encoder, missing, fresh)
            if self.root is not None:
                self._write(encoder, missing, fresh)
        return torch.stack([self._rows[(encoder, k)] for k in keys])

    def _keep(self, encoder: str, keys: Sequence[str], rows: torch.Tensor) -> None:
        for key, row in zip(keys, rows):
            self._rows.setdefault((encoder, key), row)

    def _read(self, encoder: str, wanted: set[str], row_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Loads the shards of `encoder` that hold any `wanted` row; removes the ones that fail a check."""
        folder = self.root / encoder
        shards = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        damaged: list[tuple[Path, str]] = []
        for path in shards:
            if not wanted:
                break
            try:
                keys = shard_keys(path)
                if wanted.isdisjoint(keys):
                    continue
                rows = load_shard(path, encoder, row_shape, dtype)
            except FileNotFoundError:
                continue  # removed by another process since the listing
            except CacheEntryError as err:
                damaged.append((path, str(err)))
                path.unlink(missing_ok=True)
                continue
            self._keep(encoder, keys, rows)
            wanted.difference_update(keys)
        if damaged:
            log.warning(f"encoding cache: {len(damaged)} damaged entr{'y' if len(damaged) == 1 else 'ies'} "
                        f"removed and re-encoded ({damaged[0][0]}: {damaged[0][1]})")

    def _write(self, encoder: str, keys: list[str], rows: torch.Tensor) -> None:
        path = self.root / encoder / f"{shard_name(encoder, keys)}.safetensors"
        metadata = {"format": FORMAT, "encoder": encoder, "keys": json.dumps(keys),
                    "sha256": hashlib.sha256(tensor_bytes(rows)).hexdigest()}
        try:
            atomic_replace(path, lambda tmp: save_file({ROWS: rows}, str(tmp), metadata=metadata))
        except OSError as err:  # a cache that cannot be written only costs time
            log.warning(f"encoding cache: cannot write {path} ({err.strerror or err}); continuing without it")


def shard_name(encoder: str, keys: Sequence[str]) -> str:
    return sha256_hex(encoder, *keys)[:40]


def shard_keys(path: Path) -> list[str]:
    """The row keys a shard declares (its header only).

    Raises:
        CacheEntryError: unreadable header, or keys that do not match the file's name.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = json.loads((handle.metadata() or {})["keys"])
    except FileNotFoundError:
        raise
    except DAMAGE as err:
        raise CacheEntryError(f"unreadable ({type(err).__name__})") from None
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise CacheEntryError("malformed keys")
    if shard_name(path.parent.name, keys) != path.stem:
        raise CacheEntryError("keys do not match the file name")
    return keys


def load_shard(path: Path, encoder: str, row_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A shard's rows, after every check.

    Raises:
        CacheEntryError: unreadable, or a format, encoder, shape, dtype or checksum mismatch.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        rows = load_file(str(path))[ROWS]
        keys = json.loads(metadata["keys"])
    except FileNotFoundError:
        raise
    except DAMAGE as err:
        raise CacheEntryError(f"unreadable ({type(err).__name__})") from None
    if metadata.get("format") != FORMAT or metadata.get("encoder") != encoder:
        raise CacheEntryError("written for another format or encoder")
    if tuple(rows.shape) != (len(keys), *row_shape) or rows.dtype != dtype:
        raise CacheEntryError(f"holds {tuple(rows.shape)} {rows.dtype}, expected {(len(keys), *row_shape)} {dtype}")
    if hashlib.sha256(tensor_bytes(rows)).hexdigest() != metadata.get("sha256"):
        raise CacheEntryError("checksum mismatch")
    return rows


def open_encoding_cache(enabled: bool, root: str | Path | None = None) -> EncodingCache:
    """The cache a command uses: on disk under `root` (default: `default_cache_root()`) when
    `enabled`, else in memory only."""
    if not enabled:
        return EncodingCache(None)
    return EncodingCache(Path(root).expanduser() if root else default_cache_root())
