"""Node ids and cluster ids."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from discovery.identity import (
    CLUSTER_ID_HEX_CHARS,
    OPEN_CLUSTER_ID,
    SERVICE_TYPE,
    cluster_id,
    is_node_id,
    load_or_create_node_id,
    new_node_id,
    replace_node_id,
)
from tests.discovery.strategies import FAST


def test_service_type() -> None:
    assert SERVICE_TYPE == "_dnet_p2p._tcp.local."


def test_new_node_ids_are_12_lowercase_hex_and_distinct() -> None:
    ids = {new_node_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 12 and is_node_id(i) for i in ids)


def test_is_node_id_rejects_other_shapes() -> None:
    for text in [
        "",
        "0123456789a",
        "0123456789abc",
        "0123456789AB",
        "0123456789ag",
        " 0123456789a",
    ]:
        assert not is_node_id(text), text


def test_no_key_is_the_open_cluster() -> None:
    assert cluster_id(None) == OPEN_CLUSTER_ID == "open"
    assert cluster_id("") == "open"


@FAST
@given(st.text(min_size=1))
def test_cluster_id_is_a_short_stable_hex_digest_that_hides_the_key(key: str) -> None:
    advertised = cluster_id(key)
    assert advertised == cluster_id(key)
    assert len(advertised) == CLUSTER_ID_HEX_CHARS
    assert all(c in "0123456789abcdef" for c in advertised)
    assert advertised != OPEN_CLUSTER_ID
    if len(key) >= 4:
        assert key not in advertised


@FAST
@given(st.text(min_size=1), st.text(min_size=1))
def test_different_keys_give_different_cluster_ids(a: str, b: str) -> None:
    if a != b:
        assert cluster_id(a) != cluster_id(b)


def test_cluster_id_is_domain_separated_from_plain_sha256() -> None:
    import hashlib

    assert cluster_id("k") != hashlib.sha256(b"k").hexdigest()[:CLUSTER_ID_HEX_CHARS]


def test_load_creates_then_reuses_the_id(tmp_path: Path) -> None:
    path = tmp_path / "state" / "node_id"
    first = load_or_create_node_id(path)
    assert is_node_id(first)
    assert path.read_text().strip() == first
    assert load_or_create_node_id(path) == first


def test_load_replaces_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "node_id"
    path.write_text("not-an-id\n")
    fresh = load_or_create_node_id(path)
    assert is_node_id(fresh)
    assert load_or_create_node_id(path) == fresh


def test_replace_persists_a_new_id_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "node_id"
    old = load_or_create_node_id(path)
    new = replace_node_id(path)
    assert new != old
    assert load_or_create_node_id(path) == new
    assert os.listdir(tmp_path) == ["node_id"]
