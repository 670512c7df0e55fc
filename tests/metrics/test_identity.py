"""The identity-embedding model and the face base model of the weights attack (weights-attack.md §4, §7)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from privdiff.data.identities import attack_split, identity_images
from privdiff.errors import ModelError
from privdiff.metrics.features import WEIGHTS_NAME
from privdiff.metrics.identity import (
    IDENTITY_EMBEDDER_DIR,
    embed_identities,
    identity_similarity,
    load_identity_embedder,
    retrieval_top1,
    victim_retrieval,
)
from privdiff.models.load import (
    CHECKSUM_FILE,
    FACE_BASE_DIR,
    load_pipeline,
    verify_checksums,
)


@pytest.fixture(scope="module")
def embedder():
    return load_identity_embedder()


def test_shipped_embedder_is_small_recorded_and_l2_normalised(embedder):
    assert embedder.id.startswith("identities@sha256:")
    assert (IDENTITY_EMBEDDER_DIR / WEIGHTS_NAME).stat().st_size <= 1_000_000
    record = yaml.safe_load((IDENTITY_EMBEDDER_DIR / "RECIPE.yaml").read_text())
    assert record["victim_retrieval_top1"] >= 0.9  # the spec's sanity threshold
    emb = embed_identities(embedder, identity_images(attack_split()[1][0], 4))
    assert emb.shape == (4, 64) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)


def test_uint8_and_float_inputs_agree(embedder):
    images = identity_images(attack_split()[1][1], 3)
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    assert torch.allclose(embed_identities(embedder, images), embed_identities(embedder, as_float), atol=1e-6)


def test_victim_retrieval_on_held_out_renders(embedder):
    # 30 victim identities, gallery renders 0..4, queries 5..7: measured 1.0 (0.97 with every
    # query on a random background); the spec's threshold is 0.9.
    victims = attack_split()[1][:30]
    assert victim_retrieval(embedder, victims, gallery_renders=5, query_renders=3) >= 0.95
    assert victim_retrieval(embedder, victims, 5, 3, query_background_swap=1.0) >= 0.85


def test_similarity_and_retrieval_helpers():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[-3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    sim = identity_similarity(a, b)
    assert sim.shape == (2, 3)
    assert sim[0, 0] == pytest.approx(0.0) and sim[1, 1] == pytest.approx(1.0)
    assert sim[0, 2] == pytest.approx((2 ** -0.5 + 1) / 2)
    assert retrieval_top1(a, ["z", "y"], b, ["z", "y", "x"]) == 0.5  # a[0] is nearest to b[2]
    assert retrieval_top1(a, np.array([2, 1]), b, np.array([0, 1, 2])) == 1.0


def test_a_tampered_embedder_is_refused(tmp_path: Path):
    folder = tmp_path / "identities"
    shutil.copytree(IDENTITY_EMBEDDER_DIR, folder)
    data = bytearray((folder / WEIGHTS_NAME).read_bytes())
    data[-1] ^= 0xFF
    (folder / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256 does not match"):
        load_identity_embedder(folder)


def test_shipped_face_base_loads_with_verified_hashes():
    listed = {line.split()[1] for line in (FACE_BASE_DIR / CHECKSUM_FILE).read_text().splitlines()}
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "model_index.json"} <= listed
    verify_checksums(FACE_BASE_DIR)
    pipe = load_pipeline(FACE_BASE_DIR)
    assert pipe.unet.config.sample_size == 8 and pipe.tokenizer("a face").input_ids
    record = yaml.safe_load((FACE_BASE_DIR / "RECIPE.yaml").read_text())
    assert record["recipe"]["caption_dropout"] == 0.1
