"""Hostile safetensors files given to `inspect` and to every option that takes an adapter
(`sample --lora`, `attack weights --adapter`): one line, exit 2, nothing written."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from privdiff.config import LoRAConfig
from privdiff.models.load import load_pipeline
from privdiff.models.lora import add_lora, save_lora
from tests.adversarial.conftest import refused, snapshot


@pytest.fixture(scope="module")
def valid_adapter(tiny_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real adapter of the test pipeline, saved the way every privdiff run saves one."""
    pipe = load_pipeline(tiny_pipeline_dir)
    cfg = LoRAConfig(rank=2, alpha=2.0)
    add_lora(pipe.unet, cfg)
    path = tmp_path_factory.mktemp("adapter") / "pytorch_lora_weights.safetensors"
    save_lora(path, pipe.unet, cfg)
    return path


def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def join_file(header: dict | str | bytes, data: bytes, length: int | None = None) -> bytes:
    encoded = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def header_length_2_63(header, data):
    return join_file(header, data, length=1 << 63), "exceeds the"


def header_length_past_the_end(header, data):
    return join_file(header, data, length=len(json.dumps(header)) + len(data) + 1), "runs past the end"


def header_not_json(header, data):
    return join_file(b"{this is not json" + b" " * 16, data), "not valid JSON"


def header_not_utf8(header, data):
    return join_file(b'{"\xff\xfe": 1}', data), "not valid JSON"


def header_deeply_nested(header, data):
    return join_file('{"x": ' + "[" * 100000 + "]" * 100000 + "}", data), "nested too deeply"


def header_duplicate_keys(header, data):
    name = _first_tensor(header)
    text = json.dumps(header)
    entry = json.dumps({name: header[name]})[1:-1]
    return join_file(text[:-1] + ", " + entry + "}", data), "duplicate key"


def header_is_a_list(header, data):
    return join_file("[1, 2, 3]", data), "not a JSON object"


def offsets_out_of_range(header, data):
    name = _first_tensor(header)
    header[name]["data_offsets"] = [0, len(data) + 1024]
    return join_file(header, data), "invalid data offsets"


def offsets_overlapping(header, data):
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    first, second = header[names[0]], header[names[1]]
    size = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + size]
    return join_file(header, data), "overlaps"


def data_truncated(header, data):
    return join_file(header, data[: len(data) // 2]), "invalid data offsets"


def shape_does_not_match_offsets(header, data):
    name = _first_tensor(header)
    header[name]["shape"] = [d * 2 for d in header[name]["shape"]]
    return join_file(header, data), "needs"


def unknown_dtype(header, data):
    header[_first_tensor(header)]["dtype"] = "F128"
    return join_file(header, data), "unknown dtype"


def metadata_not_strings(header, data):
    header["__metadata__"] = {"ss_seed": 42}
    return join_file(header, data), "__metadata__ must map strings to strings"


def shorter_than_8_bytes(header, data):
    return b"\x01\x02", "shorter than 8 bytes"


CASES: list[Callable] = [header_length_2_63, header_length_past_the_end, header_not_json, header_not_utf8,
                         header_deeply_nested, header_duplicate_keys, header_is_a_list, offsets_out_of_range,
                         offsets_overlapping, data_truncated, shape_does_not_match_offsets, unknown_dtype,
                         metadata_not_strings, shorter_than_8_bytes]
IDS = [c.__name__ for c in CASES]


def hostile_file(valid_adapter: Path, make: Callable, tmp_path: Path) -> tuple[Path, str]:
    header, data = split_file(valid_adapter)
    content, message = make(header, data)
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(content)
    return path, message


@pytest.mark.parametrize("make", CASES, ids=IDS)
def test_inspect_refuses_a_hostile_file_and_writes_neither_scrub_nor_json(make, valid_adapter, tmp_path, capsys):
    path, message = hostile_file(valid_adapter, make, tmp_path)
    before = snapshot(tmp_path)
    args = ["inspect", str(path), "--scrub", str(tmp_path / "clean.safetensors"), "--json", str(tmp_path / "r.json")]
    assert message in refused(args, capsys)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("make", CASES, ids=IDS)
def test_sample_lora_refuses_a_hostile_file(make, valid_adapter, tiny_pipeline_dir, tmp_path, capsys):
    path, message = hostile_file(valid_adapter, make, tmp_path)
    out = tmp_path / "grid.png"
    assert message in refused(["sample", "--lora", str(path), "--pretrained", str(tiny_pipeline_dir),
                               "--prompt", "a digit", "--num-images", "1", "--steps", "1", "--out", str(out)], capsys)
    assert not out.exists()


@pytest.mark.parametrize("make", CASES, ids=IDS)
def test_attack_weights_adapter_refuses_a_hostile_file(make, valid_adapter, tmp_path, capsys):
    path, message = hostile_file(valid_adapter, make, tmp_path)
    out = tmp_path / "attack"
    assert message in refused(["attack", "weights", "--adapter", str(path), "--out", str(out)], capsys)
    assert not (out / "adapter_attack.json").exists() and not (out / "adapter_attack.png").exists()


def test_the_valid_file_passes_every_check(valid_adapter, tiny_pipeline_dir, tmp_path, capsys):
    """Positive control: the untouched adapter is inspected and sampled without complaint."""
    assert main_ok(["inspect", str(valid_adapter)], capsys)
    assert main_ok(["sample", "--lora", str(valid_adapter), "--pretrained", str(tiny_pipeline_dir), "--prompt",
                    "a digit", "--num-images", "1", "--steps", "1", "--out", str(tmp_path / "g.png")], capsys)


def test_an_adapter_of_another_model_is_refused_as_mismatched(valid_adapter, tmp_path, capsys):
    """Shapes are valid for the file, wrong for the shipped face base the attack loads."""
    message = refused(["attack", "weights", "--adapter", str(valid_adapter), "--out", str(tmp_path / "a")], capsys)
    assert "the encoder was trained on" in message


@pytest.mark.parametrize("config, message", [
    ({"unet.r": "four"}, "invalid rank"),
    ({"unet.r": 2, "unet.lora_alpha": float("nan")}, "invalid rank, alpha"),
    ({"unet.r": 2, "unet.target_modules": "to_q"}, "target list"),
])
def test_a_hostile_adapter_config_in_the_header_is_refused(config, message, valid_adapter, tiny_pipeline_dir,
                                                            tmp_path, capsys):
    from safetensors import safe_open

    with safe_open(str(valid_adapter), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    path = tmp_path / "config.safetensors"
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(config)})
    assert message in refused(["sample", "--lora", str(path), "--pretrained", str(tiny_pipeline_dir), "--prompt",
                               "a digit", "--num-images", "1", "--steps", "1", "--out", str(tmp_path / "g.png")], capsys)


def main_ok(argv: list[str], capsys) -> bool:
    from privdiff.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, err
    return True


def test_tensors_are_refused_by_name_only_after_the_header_is_sound(valid_adapter):
    """read_lora never hands a hostile header to safetensors: it checks first."""
    from privdiff.errors import ModelError
    from privdiff.models.lora import read_lora

    tensors, _ = read_lora(valid_adapter)
    assert tensors and all(isinstance(t, torch.Tensor) for t in tensors.values())
    bad = valid_adapter.parent / "bad.safetensors"
    header, data = split_file(valid_adapter)
    bad.write_bytes(join_file(header, data[:-4]))
    with pytest.raises(ModelError, match="invalid data offsets|cover"):
        read_lora(bad)
