"""Hostile image folders: each is refused in one line naming the file, before anything is written
(or, for 16-bit greyscale, read correctly)."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privdiff.data.folder import load_image_folder
from tests.adversarial.conftest import refused, run_isolated
from tests.conftest import write_image_folder


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height greyscale pixels and holds almost no data: a few hundred
    bytes that a decoder without a cap would try to inflate into width·height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(4096)))
            + chunk(b"IEND", b""))


def finetune_args(data: Path, tiny_pipeline_dir: Path, out: Path) -> list[str]:
    return ["finetune", "--data", str(data), "--pretrained", str(tiny_pipeline_dir), "--out", str(out),
            "--steps", "1", "--batch-size", "2", "--quiet"]


def hostile_truncated(root: Path) -> str:
    data = (root / "img_00.png").read_bytes()
    (root / "img_00.png").write_bytes(data[: len(data) // 2])
    return "img_00.png: corrupt or truncated image"


def hostile_empty_file(root: Path) -> str:
    (root / "img_00.png").write_bytes(b"")
    return "img_00.png: not a readable image"


def hostile_bomb_over_our_cap(root: Path) -> str:
    (root / "img_00.png").write_bytes(png_header_only(8000, 8000))  # 64 M pixels > the 40 M cap
    return "img_00.png: 8000 x 8000 pixels exceeds the cap"


def hostile_bomb_over_pils_limit(root: Path) -> str:
    (root / "img_00.png").write_bytes(png_header_only(20000, 20000))  # the 400 M-pixel bomb
    return "img_00.png: declares more pixels than PIL will open"


def hostile_symlink_out_of_the_folder(root: Path) -> str:
    outside = root.parent / "outside.png"
    Image.new("RGB", (20, 20)).save(outside)
    (root / "img_00.png").unlink()
    os.symlink(outside, root / "img_00.png")
    return "resolves outside the dataset folder"


def _rewrite_first_entry(root: Path, **changes: object) -> None:
    lines = (root / "metadata.jsonl").read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), **changes})
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def hostile_dot_dot_in_metadata(root: Path) -> str:
    _rewrite_first_entry(root, file_name="../outside.png")
    return "'file_name' must be a path inside the folder"


def hostile_absolute_path_in_metadata(root: Path) -> str:
    _rewrite_first_entry(root, file_name="/etc/passwd")
    return "'file_name' must be a path inside the folder"


def hostile_non_utf8_caption(root: Path) -> str:
    meta = root / "metadata.jsonl"
    meta.write_bytes(meta.read_bytes().replace(b"a photo of object 3", b"a ph\xf6to of object 3"))
    return "metadata.jsonl:4: not UTF-8 text"


def hostile_cmyk(root: Path) -> str:
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(root / "img_00.tif")
    (root / "img_00.png").unlink()
    _rewrite_first_entry(root, file_name="img_00.tif")
    return "img_00.tif: unsupported image mode CMYK"


def hostile_caption_not_a_string(root: Path) -> str:
    _rewrite_first_entry(root, text={"nested": ["object"]})
    return "'text' must be a string"


CASES = [hostile_truncated, hostile_empty_file, hostile_bomb_over_our_cap, hostile_bomb_over_pils_limit,
         hostile_symlink_out_of_the_folder, hostile_dot_dot_in_metadata, hostile_absolute_path_in_metadata,
         hostile_non_utf8_caption, hostile_cmyk, hostile_caption_not_a_string]


@pytest.mark.parametrize("make_hostile", CASES, ids=[c.__name__.removeprefix("hostile_") for c in CASES])
def test_hostile_image_folder_is_refused_in_one_line_and_writes_nothing(make_hostile, tmp_path: Path,
                                                                        tiny_pipeline_dir: Path, capsys):
    root = write_image_folder(tmp_path / "data", n=8)
    message = make_hostile(root)
    out = tmp_path / "run"
    assert message in refused(finetune_args(root, tiny_pipeline_dir, out), capsys)
    assert not out.exists()


def test_a_decompression_bomb_is_refused_from_its_header_in_bounded_memory(tmp_path: Path):
    """Issue 26, finding 3: a 380 KB PNG of 20000 x 20000 ended in PIL's DecompressionBombError traceback.
    Refused before any decode: the process stays far below the 400 MB the pixels would need."""
    root = write_image_folder(tmp_path / "data", n=4)
    (root / "img_00.png").write_bytes(png_header_only(20000, 20000))
    code, err, peak = run_isolated(["finetune", "--data", str(root), "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 2 and len(err.splitlines()) == 1 and "decompression bomb" in err
    assert peak < 1 << 30


def test_the_pixel_cap_is_configurable(tmp_path: Path):
    root = write_image_folder(tmp_path / "data", n=4, size=40)
    with pytest.raises(Exception, match="exceeds the cap of 1,000"):
        load_image_folder(root, 32, max_pixels=1000)
    assert len(load_image_folder(root, 32, max_pixels=1600)) == 4


def test_sixteen_bit_greyscale_is_read_scaled_to_eight_bits(tmp_path: Path):
    """Medical scans and depth maps come as 16-bit greyscale: 0 -> 0, 65535 -> 255, 32896 -> 128."""
    root = write_image_folder(tmp_path / "data", n=2)
    ramp = np.array([[0, 32896], [65535, 257]], dtype=np.uint16).repeat(16, axis=0).repeat(16, axis=1)
    Image.fromarray(ramp).save(root / "img_00.png")
    assert Image.open(root / "img_00.png").mode.startswith("I")
    image = next(ex.image for ex in load_image_folder(root, 32).examples if ex.id == "img_00.png")
    assert image.shape == (32, 32, 3)
    assert image[0, 0, 0] == 0 and image[31, 0, 0] == 255 and abs(int(image[0, 31, 0]) - 128) <= 1
    assert (image[..., 0] == image[..., 1]).all()
