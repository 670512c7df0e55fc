"""Synthetic identities (weights-attack.md §3, §11 test 5): deterministic renders, pools, trigger words."""

from __future__ import annotations

import re

import numpy as np
import pytest

from privdiff.config import DataConfig
from privdiff.data import BUILTIN_DATASETS, load_dataset
from privdiff.data.identities import (HAIR_STYLES, POOL_SIZES, attack_split, identity_images, identity_params,
                                      pool_identities, render_identity, trigger_word)
from privdiff.data.vocabulary import CAPTION_WORDS
from privdiff.errors import DataError


def test_renders_are_deterministic_and_vary_with_the_index():
    identity = pool_identities("attack")[0]
    a, b = render_identity(identity, 3), render_identity(identity, 3)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, render_identity(identity, 4))
    assert render_identity(identity, 0, size=16).shape == (16, 16, 3)


def test_identity_images_stack_the_renders():
    identity = pool_identities("base")[5]
    images = identity_images(identity, 3, start=2)
    assert images.shape == (3, 32, 32, 3)
    assert np.array_equal(images[1], render_identity(identity, 3))


def test_background_override_keeps_the_pose():
    identity = pool_identities("embedding")[0]
    own, other = render_identity(identity, 1), render_identity(identity, 1, background=(0.5, 0.5))
    assert not np.array_equal(own, other)
    assert render_identity(identity, 1, background=(0.5, 0.5)).tobytes() == other.tobytes()


def test_identities_differ():
    params = [identity_params(i) for i in pool_identities("base")]
    assert len(set(params)) == len(params)
    assert {p.hair_style for p in params} == set(HAIR_STYLES)
    assert {p.accessory for p in params} == {"none", "glasses", "hat"}
    first, second = pool_identities("base")[:2]
    assert not np.array_equal(render_identity(first, 0), render_identity(second, 0))


def test_pools_are_disjoint_and_sized():
    shadows, victims = attack_split()
    pools = {"base": pool_identities("base"), "embedding": pool_identities("embedding"),
             "shadow": shadows, "victim": victims}
    assert [len(pools[k]) for k in pools] == [300, 300, 720, 180]
    assert shadows + victims == pool_identities("attack")
    names = list(pools)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(pools[a]) & set(pools[b]), (a, b)
    with pytest.raises(DataError, match="unknown identity pool"):
        pool_identities("nope")


def test_trigger_words_are_lowercase_unique_and_not_caption_words():
    identities = [i for pool in POOL_SIZES for i in pool_identities(pool)]
    words = [trigger_word(i) for i in identities]
    assert len(words) == 1500
    assert all(re.fullmatch(r"[a-z]{4,11}", w) for w in words)
    assert len(set(words)) == len(words)
    assert not set(words) & set(CAPTION_WORDS)
    assert trigger_word(identities[7]) == words[7]
    assert re.fullmatch(r"[a-z]{4,11}", trigger_word(12345)) and trigger_word(12345) not in words


def test_builtin_dataset_loads_through_the_registry():
    assert "identities" in BUILTIN_DATASETS
    a = load_dataset(DataConfig(name="identities", num_examples=12, seed=1))
    b = load_dataset(DataConfig(name="identities", num_examples=12, seed=1))
    assert len(a) == 12 and a.content_hash == b.content_hash
    base = set(pool_identities("base"))
    for ex in a.examples:
        _, identity, index = ex.id.split("-")
        assert ex.caption == "a face" and int(identity) in base and 0 <= int(index) < 20
        assert np.array_equal(ex.image, render_identity(int(identity), int(index)))
    with pytest.raises(DataError, match="only 6000 exist"):  # 300 identities x 20 renders
        load_dataset(DataConfig(name="identities", num_examples=6001))
