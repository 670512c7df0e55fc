"""Bad data: a clear one-line error naming the file, exit code 2, and no output written."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privdiff.cli import main
from privdiff.config import DataConfig
from privdiff.data import load_dataset
from tests.conftest import write_image_folder


def test_valid_folder_loads_with_explicit_conversions(tmp_path: Path):
    root = write_image_folder(tmp_path / "d", n=3, size=24)
    Image.fromarray(np.full((10, 14), 200, np.uint8), mode="L").save(root / "gray.png")
    Image.fromarray(np.zeros((12, 12, 4), np.uint8), mode="RGBA").save(root / "alpha.png")
    with open(root / "metadata.jsonl", "a") as fh:
        fh.write(json.dumps({"file_name": "gray.png"}) + "\n")
        fh.write(json.dumps({"file_name": "alpha.png", "text": "clear"}) + "\n")
    ds = load_dataset(DataConfig(name=str(root), image_size=16, num_examples=None))
    assert len(ds) == 5 and all(ex.image.shape == (16, 16, 3) for ex in ds.examples)
    gray = ds.subset(["gray.png"])[0]
    assert gray.caption == "" and (gray.image == 200).all()
    assert (ds.subset(["alpha.png"])[0].image == 0).all()  # fully transparent over black


def _truncate(root: Path) -> str:
    path = root / "img_01.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "img_01.png"


def _corrupt(root: Path) -> str:
    (root / "img_02.png").write_bytes(b"this is not a png at all")
    return "img_02.png"


def _cmyk(root: Path) -> str:
    Image.new("CMYK", (20, 20)).save(root / "img_03.jpg")
    _append(root, {"file_name": "img_03.jpg"})
    return "img_03.jpg"


def _float_image(root: Path) -> str:  # 16-bit greyscale is read (tests/adversarial); float is refused
    Image.fromarray(np.zeros((8, 8), np.float32)).save(root / "deep.tif")
    _append(root, {"file_name": "deep.tif"})
    return "deep.tif"


def _unlisted(root: Path) -> str:
    Image.new("RGB", (8, 8)).save(root / "stray.png")
    return "stray.png"


def _missing_image(root: Path) -> str:
    (root / "img_04.png").unlink()
    return "img_04.png"


def _no_metadata(root: Path) -> str:
    (root / "metadata.jsonl").unlink()
    return "metadata.jsonl"


def _empty(root: Path) -> str:
    for p in root.glob("*.png"):
        p.unlink()
    (root / "metadata.jsonl").write_text("\n")
    return "dataset is empty"


def _duplicate(root: Path) -> str:
    _append(root, {"file_name": "img_00.png", "text": "again"})
    return "duplicate file_name 'img_00.png'"


def _bad_json(root: Path) -> str:
    with open(root / "metadata.jsonl", "a") as fh:
        fh.write("{oops\n")
    return "metadata.jsonl:7: invalid JSON"


def _escape(root: Path) -> str:
    _append(root, {"file_name": "../outside.png"})
    return "must be a path inside the folder"


def _append(root: Path, row: dict) -> None:
    with open(root / "metadata.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


BAD_INPUTS = {"truncated": (_truncate, "corrupt or truncated"), "corrupt": (_corrupt, "not a readable image"),
              "cmyk": (_cmyk, "unsupported image mode CMYK"), "float": (_float_image, "unsupported image mode F"),
              "unlisted": (_unlisted, "has no entry in metadata.jsonl"),
              "missing-image": (_missing_image, "image file not found"),
              "no-metadata": (_no_metadata, "no metadata.jsonl"), "empty": (_empty, "dataset is empty"),
              "duplicate": (_duplicate, "duplicate"), "bad-json": (_bad_json, "invalid JSON"),
              "path-escape": (_escape, "inside the folder")}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_data_fails_cleanly_through_the_cli(case: str, tmp_path: Path, capsys, tiny_pipeline_dir: Path):
    root = write_image_folder(tmp_path / "data")
    damage, message = BAD_INPUTS[case]
    named = damage(root)
    out = tmp_path / "run"

    code = main(["finetune", "--data", str(root), "--out", str(out), "--pretrained", str(tiny_pipeline_dir),
                 "--steps", "1", "--quiet"])

    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert message in err and named in err
    assert not out.exists()  # nothing partial written
