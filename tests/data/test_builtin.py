import numpy as np
import pytest

from privdiff.config import DataConfig
from privdiff.data import BUILTIN_DATASETS, load_dataset
from privdiff.errors import DataError


@pytest.mark.parametrize("name", sorted(BUILTIN_DATASETS))
def test_builtin_shapes_captions_and_determinism(name: str):
    a = load_dataset(DataConfig(name=name, image_size=16, num_examples=8, seed=3))
    b = load_dataset(DataConfig(name=name, image_size=16, num_examples=8, seed=3))
    assert len(a) == 8 and a.content_hash == b.content_hash
    for ex in a.examples:
        assert ex.image.shape == (16, 16, 3) and ex.image.dtype == np.uint8
        assert ex.caption
        assert (ex.conditioning is not None) == (name == "fill")


def test_digits_are_real_and_captioned_by_label():
    ds = load_dataset(DataConfig(name="digits", num_examples=None))
    assert len(ds) == 1797  # every image of scikit-learn's optdigits copy
    assert {ex.caption.split()[-1] for ex in ds.examples} == {
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}


def test_faces_are_the_lfw_faces():
    ds = load_dataset(DataConfig(name="faces", num_examples=None))
    assert len(ds) == 100
    # grayscale source, converted explicitly to three identical channels
    img = ds[0].image
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])


def test_glyph_captions_name_letter_and_colours():
    ds = load_dataset(DataConfig(name="glyphs", num_examples=20))
    for ex in ds.examples:
        words = ex.caption.split()
        assert words[2] == "letter" and len(words[3]) == 1 and words[-1] == "background"


def test_different_seeds_give_different_subsets():
    a = load_dataset(DataConfig(name="digits", num_examples=16, seed=0))
    b = load_dataset(DataConfig(name="digits", num_examples=16, seed=1))
    assert [e.id for e in a.examples] != [e.id for e in b.examples]


def test_too_many_examples_requested():
    with pytest.raises(DataError, match="only 100 exist"):
        load_dataset(DataConfig(name="faces", num_examples=101))


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        load_dataset(DataConfig(name="nope"))
