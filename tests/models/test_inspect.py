"""`privdiff inspect`: header metadata leaks of LoRA files, and the scrubbed copy (weights-attack.md §9)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from privdiff.cli import main
from privdiff.models.inspect import allowed, inspect_file, read_header
from privdiff.models.lora import LORA_WEIGHT_NAME, read_lora

KOHYA_KEYS = {
    "ss_tag_frequency": json.dumps({"10_sks person": {"sks person": 12, "smiling": 3}}),
    "ss_dataset_dirs": json.dumps({"10_sks person": {"n_repeats": 10, "img_count": 12}}),
    "ss_datasets": json.dumps([{"image_dir": "/home/alice/photos/sks"}]),
    "ss_seed": "1234",
    "ss_num_train_images": "120",
    "ss_training_started_at": "1712345678.5",
    "ss_output_name": "alice_lora",
    "ss_learning_rate": "0.0001",
    "ss_training_comment": "made by alice@example.com",
}


@pytest.fixture
def kohya_file(finished_tiny_run: Path, tmp_path: Path) -> Path:
    tensors, metadata = read_lora(finished_tiny_run / LORA_WEIGHT_NAME)
    path = tmp_path / "kohya_style.safetensors"
    save_file(tensors, str(path), metadata={**metadata, **KOHYA_KEYS})
    return path


def _data_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return raw[8 + length:]


def test_inspect_flags_a_kohya_style_header_with_exit_code_3(kohya_file, tmp_path, capsys):
    assert main(["inspect", str(kohya_file), "--json", str(tmp_path / "report.json")]) == 3
    report = json.loads((tmp_path / "report.json").read_text())
    severity = {f["key"]: f["severity"] for f in report["findings"]}
    for key in ("ss_tag_frequency", "ss_dataset_dirs", "ss_datasets", "ss_training_comment"):
        assert severity[key] == "high", key
    for key in ("ss_seed", "ss_num_train_images", "ss_training_started_at", "ss_output_name"):
        assert severity[key] == "medium", key
    assert severity["ss_learning_rate"] == "low"
    assert "format" not in severity and "lora_adapter_metadata" not in severity  # allow-listed
    assert "ss_tag_frequency" in capsys.readouterr().out


def test_scrub_removes_every_flagged_key_keeps_tensors_and_loads(kohya_file, tmp_path, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    clean = tmp_path / "clean.safetensors"
    assert main(["inspect", str(kohya_file), "--scrub", str(clean)]) == 0
    _, metadata, _ = read_header(clean)
    assert metadata and all(allowed(k) for k in metadata)
    assert not set(KOHYA_KEYS) & set(metadata)
    assert not inspect_file(clean)["findings"]
    assert _data_bytes(clean) == _data_bytes(kohya_file)  # tensor bytes copied verbatim
    with safe_open(str(clean), "pt") as a, safe_open(str(kohya_file), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir), safety_checker=None)
    pipe.load_lora_weights(str(clean))
    assert main(["inspect", str(clean)]) == 0
    no_config = tmp_path / "no_config.safetensors"
    assert main(["inspect", str(kohya_file), "--scrub", str(no_config), "--drop-config"]) == 0
    assert "lora_adapter_metadata" not in read_header(no_config)[1]


def test_a_freshly_saved_privdiff_adapter_is_clean(finished_tiny_run):
    report = inspect_file(finished_tiny_run / LORA_WEIGHT_NAME)
    assert report["findings"] == [] and not report["leaks"]


@pytest.mark.parametrize("payload", [
    b"\x05\x00",                                               # shorter than the length field
    struct.pack("<Q", 10) + b"{not json}",                      # malformed JSON
    struct.pack("<Q", 200 * 1024 * 1024) + b"{}",               # oversized header
    struct.pack("<Q", 64) + b"{}",                              # length past the end
    struct.pack("<Q", 40) + b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,99]}}'[:40],
])
def test_a_corrupt_header_is_a_one_line_error_and_writes_nothing(tmp_path, capsys, payload):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(payload)
    out = tmp_path / "clean.safetensors"
    assert main(["inspect", str(bad), "--scrub", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".clean*"))


def test_scrub_refuses_to_write_in_place(kohya_file, capsys):
    assert main(["inspect", str(kohya_file), "--scrub", str(kohya_file)]) == 2
    assert "other than the input" in capsys.readouterr().err
