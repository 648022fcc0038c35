"""The hop latencies a node hands the planner: half the least recent round trip, so a busy
moment (a node starting, loading a model) never prices the network."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from discovery.identity import cluster_id
from dnet.node.membership import (
    LATENCY_SAMPLES,
    Addressing,
    Membership,
    one_way_latency_ms,
)
from dnet.proto import dnet_ring_pb2 as pb
from tests.discovery.strategies import peer_info


def membership() -> Membership:
    me = peer_info("aaaaaaaaaaaa", address="127.0.0.1", cluster_id=cluster_id("key"))
    return Membership(me, host=None, id_path=Path("/nonexistent"), on_id_change=lambda n: None,
                      addressing=Addressing(pinned=True))


def test_a_hop_is_half_the_least_round_trip() -> None:
    assert one_way_latency_ms([29.9, 0.42, 3.1, 0.5]) == pytest.approx(0.21)
    with pytest.raises(ValueError):
        one_way_latency_ms([])


def test_start_up_spikes_do_not_price_the_network_and_old_samples_age_out() -> None:
    members = membership()
    for round_trip in (59.8, 31.0, 0.4, 12.0):  # a peer starting up, then one quiet answer
        members.record_round_trip("bbbbbbbbbbbb", round_trip)
    assert members.latencies_ms() == {"bbbbbbbbbbbb": pytest.approx(0.2)}
    # The network got slower for good (the peer moved to Wi-Fi): once the window has passed,
    # the latency follows.
    for _ in range(LATENCY_SAMPLES):
        members.record_round_trip("bbbbbbbbbbbb", 5.0)
    assert members.latencies_ms() == {"bbbbbbbbbbbb": pytest.approx(2.5)}


def test_a_peer_that_is_gone_has_no_latency() -> None:
    members = membership()
    peer = peer_info("bbbbbbbbbbbb", cluster_id=cluster_id("key"))
    members.on_add(peer)
    now = time.monotonic()
    members.apply_health([(peer, pb.HealthReply(node_id=peer.node_id))], now)
    members.record_round_trip(peer.node_id, 0.5)
    assert members.latencies_ms() == {peer.node_id: 0.25}
    members.apply_health([(peer, None)], now + 100.0)  # past the peer timeout: dropped
    assert members.latencies_ms() == {}
