from pathlib import Path

import pytest

from privdiff.config import MembershipConfig
from privdiff.data import ROLES, build_manifest, load_manifest, role_counts
from privdiff.errors import DataError
from privdiff.runs.files import atomic_write_json


@pytest.mark.parametrize("n, expected", [
    (833, (200, 233, 200, 200)),  # the reference split of smp-lora.md §2
    (256, (61, 72, 62, 61)),      # the worked example of smp-lora.md §2
])
def test_role_counts_match_the_spec(n: int, expected: tuple[int, ...]):
    counts = role_counts(n, MembershipConfig())
    assert tuple(counts[r] for r in ROLES) == expected
    assert sum(counts.values()) == n


def test_manifest_is_deterministic_disjoint_and_complete():
    ids = [f"x{i}" for i in range(100)]
    a = build_manifest(ids, "d", "hash", MembershipConfig(seed=1))
    b = build_manifest(ids, "d", "hash", MembershipConfig(seed=1))
    c = build_manifest(ids, "d", "hash", MembershipConfig(seed=2))
    assert a.roles == b.roles and a.roles != c.roles
    assert sorted(a.roles) == sorted(ids)
    assert set(a.members) == set(a.ids("member_aux")) | set(a.ids("member_test"))
    assert not set(a.members) & set(a.ids("nonmember_aux", "nonmember_test"))


def test_manifest_round_trip_and_hash_check(tmp_path: Path):
    manifest = build_manifest([f"x{i}" for i in range(20)], "d", "abc", MembershipConfig())
    atomic_write_json(tmp_path / "membership.json", manifest.to_json())
    loaded = load_manifest(tmp_path / "membership.json", dataset_hash="abc")
    assert loaded == manifest
    with pytest.raises(DataError, match="different data"):
        load_manifest(tmp_path / "membership.json", dataset_hash="other")


def test_too_small_dataset_is_refused():
    with pytest.raises(DataError, match="too few for a membership manifest"):
        build_manifest(["a", "b", "c"], "d", "h", MembershipConfig())


def test_malformed_manifest(tmp_path: Path):
    path = tmp_path / "membership.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="not a valid membership manifest"):
        load_manifest(path)
