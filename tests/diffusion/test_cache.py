"""The encoding cache: hits, misses, keys, damaged entries, and results bit-identical without it."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import save_file

from privdiff.audit.run import audit_cache, encode_candidates
from privdiff.audit.shadows import train_shadows
from privdiff.config import DataConfig, load_config
from privdiff.data import load_dataset
from privdiff.data.examples import Example, ImageDataset
from privdiff.diffusion.cache import (
    CACHE_ENV,
    EncodingCache,
    default_cache_root,
    open_encoding_cache,
    shard_name,
    tensor_bytes,
)
from privdiff.diffusion.task import (
    ENCODE_BATCH,
    build_task,
    encode_split,
    in_fixed_batches,
)
from privdiff.errors import ConfigError
from privdiff.models.load import load_pipeline
from privdiff.runs.files import save_config
from privdiff.runs.folder import open_run, prepare_run_dir
from privdiff.runs.lock import writing_run_folder
from privdiff.training.run import run_pipeline


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir: Path):
    return load_pipeline(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_dataset(DataConfig(name="digits", num_examples=24))


@pytest.fixture
def calls(pipe, monkeypatch):
    """Rows each encoder was called on, by encoder (the VAE's `encode`, the text encoder's forward)."""
    seen = {"vae": [], "text": []}
    encode = pipe.vae.encode

    def counting_encode(images, *args, **kwargs):
        seen["vae"].append(len(images))
        return encode(images, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "encode", counting_encode)
    hook = pipe.text_encoder.register_forward_hook(lambda module, args, out: seen["text"].append(len(args[0])))
    yield seen
    hook.remove()


def ids_of(dataset: ImageDataset) -> list[str]:
    return [ex.id for ex in dataset.examples]


def stored_rows(root: Path, kind: str) -> int:
    """Rows of `kind` (latents, contexts) in every shard under `root`."""
    total = 0
    for path in root.glob(f"{kind}-*/*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            total += len(json.loads(handle.metadata()["keys"]))
    return total


def assert_same_task(a, b) -> None:
    for name in ("latents", "contexts", "null_context"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.example_ids == b.example_ids and a.splits.keys() == b.splits.keys()
    for role in a.splits:
        assert torch.equal(a.splits[role].latents, b.splits[role].latents)
        assert torch.equal(a.splits[role].contexts, b.splits[role].contexts)


def test_a_second_build_reads_every_row_and_calls_no_encoder(pipe, digits, calls, tmp_path: Path):
    members, others = digits.subset(ids_of(digits)[:16]), {"nonmember_aux": digits.subset(ids_of(digits)[16:])}
    first = build_task(pipe, members, others, cache=EncodingCache(tmp_path))
    assert calls["vae"] and calls["text"]
    assert stored_rows(tmp_path, "latents") == 24
    assert stored_rows(tmp_path, "contexts") == len(set(digits.captions())) + 1  # distinct captions and ""

    calls["vae"].clear(), calls["text"].clear()
    second = build_task(pipe, members, others, cache=EncodingCache(tmp_path))
    assert calls == {"vae": [], "text": []}
    assert_same_task(first, second)


def test_results_are_bit_identical_with_and_without_the_cache(pipe, digits, tmp_path: Path):
    """Rows written while encoding another subset (in other batches) are the rows a fresh encoding makes."""
    ids = ids_of(digits)
    encode_split(pipe, digits.subset(ids[5:19:2] + ids[:-6:-1]), cache=EncodingCache(tmp_path))
    members, others = digits.subset(ids[:16]), {"nonmember_aux": digits.subset(ids[16:])}
    assert_same_task(build_task(pipe, members, others, cache=EncodingCache(tmp_path)),
                     build_task(pipe, members, others, cache=EncodingCache(None)))


def test_subsets_of_encoded_examples_hit_the_cache(pipe, digits, calls, tmp_path: Path):
    """Members and non-members, the audit's roles and LiRA shadows' halves are subsets of one dataset."""
    encode_split(pipe, digits, cache=EncodingCache(tmp_path))
    calls["vae"].clear(), calls["text"].clear()
    ids = ids_of(digits)
    rng = np.random.default_rng(0)
    for subset in (ids[:13], ids[13:], sorted(rng.choice(ids, 12, replace=False)), ids[::-1]):
        split = encode_split(pipe, digits.subset(list(subset)), cache=EncodingCache(tmp_path))
        assert split.ids == list(subset)
    assert calls == {"vae": [], "text": []}


@pytest.mark.slow
def test_lira_shadows_and_a_second_audit_read_the_run_s_encodings(finished_tiny_run: Path, monkeypatch,
                                                                    tmp_path: Path):
    run = open_run(finished_tiny_run)
    roles = ("member_aux", "member_test", "nonmember_aux", "nonmember_test")
    encode_candidates(run, run_pipeline(run), roles, audit_cache(run, True))  # the non-members the run never saw
    calls = []
    encode = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda vae, images, *a, **k: calls.append(len(images))
                        or encode(vae, images, *a, **k))
    encode_candidates(run, run_pipeline(run), roles, audit_cache(run, True))
    shadows = train_shadows(run, 2, 0, tmp_path / "shadows", show_progress=False)
    assert len(shadows.models) == 2 and (tmp_path / "shadows" / "shadow-01" / "summary.json").is_file()
    assert calls == []


def test_encoder_calls_have_a_fixed_batch_size(pipe, digits, calls):
    encode_split(pipe, digits.subset(ids_of(digits)[:3]))
    assert calls["vae"] == [ENCODE_BATCH] and calls["text"] == [ENCODE_BATCH]
    rows = torch.arange(70.0).reshape(70, 1)
    assert torch.equal(in_fixed_batches(lambda batch: batch * 2, rows, batch_size=32), rows * 2)


def _changed(dataset: ImageDataset, index: int, image: np.ndarray | None = None,
             caption: str | None = None) -> ImageDataset:
    examples = list(dataset.examples)
    old = examples[index]
    examples[index] = Example(old.id, old.image if image is None else image, old.caption if caption is None else caption)
    return ImageDataset(dataset.name, examples)


def test_a_changed_image_or_caption_is_a_new_row(pipe, digits, tmp_path: Path):
    encode_split(pipe, digits, cache=EncodingCache(tmp_path))
    latents, contexts = stored_rows(tmp_path, "latents"), stored_rows(tmp_path, "contexts")
    image = digits.examples[3].image.copy()
    image[0, 0, 0] ^= 1
    encode_split(pipe, _changed(digits, 3, image=image), cache=EncodingCache(tmp_path))
    assert (stored_rows(tmp_path, "latents"), stored_rows(tmp_path, "contexts")) == (latents + 1, contexts)
    encode_split(pipe, _changed(digits, 3, caption="a caption never seen"), cache=EncodingCache(tmp_path))
    assert (stored_rows(tmp_path, "latents"), stored_rows(tmp_path, "contexts")) == (latents + 1, contexts + 1)


def test_another_resolution_or_other_weights_miss(pipe, digits, calls, tmp_path: Path):
    encode_split(pipe, digits, cache=EncodingCache(tmp_path))
    small = load_dataset(DataConfig(name="digits", num_examples=24, image_size=16))
    calls["vae"].clear()
    encode_split(pipe, small, cache=EncodingCache(tmp_path))
    assert calls["vae"] and stored_rows(tmp_path, "latents") == 48
    folders = {p.name for p in tmp_path.iterdir()}
    weight = pipe.vae.encoder.conv_in.bias
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-3)
    try:
        encode_split(pipe, digits, cache=EncodingCache(tmp_path))
    finally:
        with torch.no_grad():
            weight.copy_(original)
    new = {p.name for p in tmp_path.iterdir()} - folders
    assert len(new) == 1 and next(iter(new)).startswith("latents-")  # the text encoder's rows still hit


def _damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _damage_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the tensor data
    path.write_bytes(bytes(data))


def _damage_shape(path: Path) -> None:
    """Rows of another shape under the same keys, with a checksum that matches them."""
    with safe_open(str(path), framework="pt") as handle:
        metadata, rows = handle.metadata(), handle.get_tensor("rows")
    rows = rows[..., :-1].contiguous()
    save_file({"rows": rows}, str(path), metadata={**metadata, "sha256": hashlib.sha256(tensor_bytes(rows)).hexdigest()})


def _damage_keys(path: Path) -> None:
    with safe_open(str(path), framework="pt") as handle:
        metadata, rows = handle.metadata(), handle.get_tensor("rows")
    keys = json.loads(metadata["keys"])
    save_file({"rows": rows}, str(path), metadata={**metadata, "keys": json.dumps(keys[::-1])})


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_flip, _damage_shape, _damage_keys],
                         ids=["truncated", "flipped-byte", "wrong-shape", "wrong-keys"])
def test_a_damaged_entry_is_reported_once_and_rebuilt(damage, pipe, digits, calls, tmp_path: Path, caplog):
    clean = encode_split(pipe, digits, cache=EncodingCache(tmp_path))
    (shard,) = tmp_path.glob("latents-*/*.safetensors")
    damage(shard)
    calls["vae"].clear()
    with caplog.at_level(logging.WARNING, logger="privdiff.cache"):
        again = encode_split(pipe, digits, cache=EncodingCache(tmp_path))
    assert torch.equal(again.latents, clean.latents) and calls["vae"]
    (warning,) = caplog.records
    assert "damaged" in warning.getMessage() and "\n" not in warning.getMessage()
    caplog.clear()
    calls["vae"].clear()
    encode_split(pipe, digits, cache=EncodingCache(tmp_path))  # rebuilt: a clean hit
    assert not caplog.records and not calls["vae"]


def test_a_shard_names_its_keys(pipe, digits, tmp_path: Path):
    encode_split(pipe, digits, cache=EncodingCache(tmp_path))
    for path in tmp_path.glob("*/*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            assert path.stem == shard_name(path.parent.name, json.loads(handle.metadata()["keys"]))


def test_no_cache_reads_and_writes_nothing(pipe, digits, tmp_path: Path):
    bypass = open_encoding_cache(False, tmp_path / "never")
    encode_split(pipe, digits, cache=bypass)
    assert bypass.root is None and not (tmp_path / "never").exists()


def test_an_unwritable_cache_warns_and_the_work_goes_on(pipe, digits, tmp_path: Path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="privdiff.cache"):
        split = encode_split(pipe, digits, cache=EncodingCache(blocked))
    assert len(split) == len(digits) and "cannot write" in caplog.text


def test_the_default_root_is_the_environment_s_and_tests_never_use_the_home_cache(monkeypatch, tmp_path: Path):
    assert Path.home() not in default_cache_root().parents  # conftest points PRIVDIFF_CACHE at a temporary folder
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert default_cache_root() == tmp_path / "mine"
    assert open_encoding_cache(True).root == tmp_path / "mine"
    assert open_encoding_cache(True, str(tmp_path / "other")).root == tmp_path / "other"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "privdiff" / "encodings"


def test_a_run_resumes_with_the_cache_switched(tmp_path: Path):
    """The cache never changes a result, so resuming may switch it (or move it)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(load_config(None, [f"output_dir={run_dir}"]), run_dir / "config.yaml")
    switched = load_config(None, [f"output_dir={run_dir}", "cache.enabled=false", f"cache.dir={tmp_path}"])
    with writing_run_folder(run_dir):
        assert prepare_run_dir(run_dir, switched, resume=True, overwrite=False) is False
    other = load_config(None, [f"output_dir={run_dir}", "train.steps=7"])
    with writing_run_folder(run_dir), pytest.raises(ConfigError, match="config differs"):
        prepare_run_dir(run_dir, other, resume=True, overwrite=False)
