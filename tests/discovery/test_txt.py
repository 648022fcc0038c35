"""The TXT codec: round trips, size limits, and nothing from the network can make it raise."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from discovery.mdns import instance_label
from discovery.txt import (
    KEY_VERSION,
    MAX_MODEL_BYTES,
    MAX_TXT_STRING_BYTES,
    TRUNCATED_FIELDS,
    TXT_VERSION,
    decode_txt,
    encode_txt,
    truncate_utf8,
)
from tests.discovery.strategies import FAST, peer_info, peer_infos

A = peer_info("aaaaaaaaaaaa")


def as_network(txt: dict[str, str]) -> dict[bytes, bytes | None]:
    """What zeroconf hands back for the properties we registered."""
    return {key.encode(): value.encode() for key, value in txt.items()}


def decode_of(info, properties=None):
    properties = as_network(encode_txt(info)) if properties is None else properties
    return decode_txt(properties, [info.address], info.grpc_port, info.instance)


@FAST
@given(peer_infos())
def test_round_trip(info) -> None:
    assert decode_of(info) == info


@FAST
@given(peer_infos(), st.text(max_size=300), st.text(max_size=300), st.text(max_size=300))
def test_every_txt_string_fits_in_255_bytes(info, name: str, chip: str, version: str) -> None:
    txt = encode_txt(replace(info, name=name, chip=chip, version=version, platform=chip))
    assert txt[KEY_VERSION] == TXT_VERSION
    for key, value in txt.items():
        assert len(f"{key}={value}".encode()) <= MAX_TXT_STRING_BYTES
    decoded = decode_of(info, as_network(txt))
    assert decoded is not None and name.startswith(decoded.name)


def test_descriptive_fields_are_cut_on_a_utf8_boundary() -> None:
    long_name = "é" * 100
    txt = encode_txt(replace(A, name=long_name))
    assert txt["name"] == "é" * (TRUNCATED_FIELDS["name"] // 2)
    assert truncate_utf8("aé", 2) == "a"


@pytest.mark.parametrize(
    "bad",
    [
        replace(A, node_id="not-an-id"),
        replace(A, model="m" * (MAX_MODEL_BYTES + 1)),
        replace(A, cluster_id=""),
        replace(A, started_at=float("nan")),
        replace(A, memory_budget_bytes=-1),
        replace(A, http_port=0),
    ],
)
def test_unadvertisable_values_are_refused(bad) -> None:
    with pytest.raises(ValueError):
        encode_txt(bad)


def test_records_of_another_version_or_foreign_services_are_ignored() -> None:
    good = as_network(encode_txt(A))
    assert decode_of(A, {**good, b"v": b"2"}) is None
    assert decode_of(A, {b"path": b"/", b"foo": None}) is None
    assert decode_of(A, {}) is None
    for key in [b"v", b"id", b"http", b"mem", b"start", b"cl"]:
        missing = {k: v for k, v in good.items() if k != key}
        assert decode_of(A, missing) is None, key
        assert decode_of(A, {**good, key: None}) is None, key


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (b"id", b"ABCDEFABCDEF"),
        (b"http", b"0"),
        (b"http", b"70000"),
        (b"http", b"+80"),
        (b"mem", b"-1"),
        (b"mem", b"1_000"),
        (b"start", b"inf"),
        (b"start", b"nan"),
        (b"start", b"yesterday"),
        (b"name", b"\xff\xfe"),
    ],
)
def test_malformed_values_are_ignored(key: bytes, value: bytes) -> None:
    assert decode_of(A, {**as_network(encode_txt(A)), key: value}) is None


def test_keys_are_case_insensitive_and_optional_fields_default_to_empty() -> None:
    txt = {k.upper().encode(): v.encode() for k, v in encode_txt(A).items() if k != "model"}
    assert decode_of(A, txt) == replace(A, model="")


def test_address_and_port_come_from_the_resolved_record() -> None:
    props = as_network(encode_txt(A))
    assert decode_txt(props, ["fe80::1", "0.0.0.0", "10.1.2.3"], 7000, "i").address == "10.1.2.3"
    assert decode_txt(props, ["fe80::1"], 7000, "i") is None
    assert decode_txt(props, [], 7000, "i") is None
    assert decode_txt(props, ["10.1.2.3"], 0, "i") is None
    assert decode_txt(props, ["10.1.2.3"], None, "i") is None  # type: ignore[arg-type]
    assert decode_txt(props, ["10.1.2.3"], 7000, "") is None
    assert decode_txt(props, ["x", "255.255.255.255", "192.168.1.5"], 7000, "i").address == \
        "192.168.1.5"


@FAST
@given(
    st.dictionaries(st.binary(max_size=8), st.one_of(st.none(), st.binary(max_size=40))),
    st.lists(st.text(max_size=16), max_size=3),
    st.integers(-5, 70000),
    st.text(max_size=10),
)
def test_decode_never_raises_on_garbage(props, addresses, port: int, instance: str) -> None:
    decode_txt(props, addresses, port, instance)


@FAST
@given(
    peer_infos(),
    st.sampled_from([b"v", b"id", b"http", b"mem", b"start", b"cl", b"name"]),
    st.binary(max_size=30),
)
def test_decode_never_raises_on_a_corrupted_field(info, key: bytes, value: bytes) -> None:
    decoded = decode_of(info, {**as_network(encode_txt(info)), key: value})
    assert decoded is None or decoded.node_id


@FAST
@given(st.text(max_size=80), st.text(alphabet="0123456789abcdef", min_size=12, max_size=12))
def test_instance_labels_are_dns_safe(name: str, node_id: str) -> None:
    label = instance_label(name, node_id)
    assert label.endswith(f"-{node_id}")
    assert len(label.encode()) <= 63 - 4  # room for zeroconf's "-N" rename suffix
    assert all(c.isascii() and (c.isalnum() or c == "-") for c in label)
    assert not label.startswith("-")


def test_instance_label_examples() -> None:
    assert instance_label("Jörg's MacBook Pro", "0123456789ab") == "J-rg-s-MacBook-Pro-0123456789ab"
    assert instance_label("...", "0123456789ab") == "dnet-0123456789ab"
