"""Hypothesis strategies and builders shared by the discovery tests."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import settings
from hypothesis import strategies as st

from discovery.identity import cluster_id
from discovery.peers import PeerInfo, PeerState

# Bounded so the whole suite stays fast on two slow cores; no deadline, CI machines stall.
FAST = settings(max_examples=100, deadline=None)

CLUSTER = cluster_id(None)
OTHER_CLUSTER = cluster_id("secret")

node_ids = st.text(alphabet="0123456789abcdef", min_size=12, max_size=12)
# A few shared ids so that collisions (same node id twice) actually happen.
small_node_ids = st.sampled_from(["aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc", "dddddddddddd"])
ipv4s = st.ip_addresses(v=4).map(str).filter(lambda a: a not in ("0.0.0.0", "255.255.255.255"))
ports = st.integers(min_value=1, max_value=65535)
started_ats = st.floats(min_value=0.0, max_value=4e9, allow_nan=False, allow_infinity=False)
short_text = st.text(max_size=20)


def peer_info(node_id: str = "0123456789ab", **overrides: object) -> PeerInfo:
    info = PeerInfo(
        node_id=node_id,
        name=f"node-{node_id}",
        address="10.0.0.1",
        grpc_port=58080,
        http_port=8080,
        memory_budget_bytes=16 << 30,
        started_at=1_700_000_000.0,
        version="0.1.0",
        platform="darwin-arm64",
        chip="Apple M2 Max",
        cluster_id=CLUSTER,
        model="",
        instance=f"node-{node_id}-{node_id}._dnet_p2p._tcp.local.",
    )
    return replace(info, **overrides)


@st.composite
def peer_infos(draw: st.DrawFn, ids: st.SearchStrategy[str] = node_ids) -> PeerInfo:
    node_id = draw(ids)
    return PeerInfo(
        node_id=node_id,
        name=draw(short_text),
        address=draw(ipv4s),
        grpc_port=draw(ports),
        http_port=draw(ports),
        memory_budget_bytes=draw(st.integers(min_value=0, max_value=1 << 45)),
        started_at=draw(started_ats),
        version=draw(short_text),
        platform=draw(short_text),
        chip=draw(short_text),
        cluster_id=draw(st.sampled_from([CLUSTER, OTHER_CLUSTER])),
        model=draw(short_text),
        instance=draw(st.sampled_from(["a", "b", "c"])) + f"-{node_id}._dnet_p2p._tcp.local.",
    )


@st.composite
def peer_states(draw: st.DrawFn, ids: st.SearchStrategy[str] = small_node_ids) -> PeerState:
    info = draw(peer_infos(ids))
    return PeerState(
        info=info,
        first_seen=0.0,
        last_alive=draw(st.floats(min_value=0.0, max_value=100.0)),
        failures=draw(st.integers(min_value=0, max_value=4)),
        epoch=draw(st.integers(min_value=0, max_value=5)),
        leads_epoch=draw(st.integers(min_value=0, max_value=5)),
        verified=draw(st.booleans()),
    )
