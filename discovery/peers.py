"""The peer table: what a node knows about the other nodes it has discovered.

Pure: the table functions return a NEW table and never mutate their input; the current
monotonic time comes in as `now`. Nothing here reads a clock, opens a socket or starts a thread.

Liveness rules (health checks are expected every `HEALTH_CHECK_INTERVAL_S`):
- A peer is *healthy* once a health check has reached it since its current registration was
  seen (`verified`) and fewer than `FAILURES_BEFORE_UNHEALTHY` checks in a row have failed
  since. Requiring one successful check means a node whose mDNS record is visible but whose
  gRPC port is not reachable (a firewall, a stale cache entry of a crashed node) never gets
  planned into a ring. Two failures in a row (about 2 s) tolerate one lost check.
- A peer is *expired* (dropped) when neither mDNS nor a health check has shown it alive for
  `PEER_TIMEOUT_S`; with 1 s ticks a dead peer is gone from the table within 10 s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

HEALTH_CHECK_INTERVAL_S = 1.0
FAILURES_BEFORE_UNHEALTHY = 2
PEER_TIMEOUT_S = 8.0


@dataclass(frozen=True)
class PeerInfo:
    """What a node advertises in its mDNS record."""

    node_id: str
    name: str
    address: str  # IPv4 address to reach it
    grpc_port: int
    http_port: int
    memory_budget_bytes: int
    started_at: float  # when the node joined, seconds since the Unix epoch (its own clock)
    version: str
    platform: str  # e.g. "darwin-arm64", "linux-x86_64"
    chip: str  # e.g. "Apple M2 Max" or the CPU model
    cluster_id: str
    model: str  # the model this node proposes ("" if none)
    instance: str  # the full mDNS service instance name (unique per registration)

    @property
    def grpc_address(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.address}:{self.http_port}"


@dataclass(frozen=True)
class PeerState:
    """A discovered peer and what this node has learned about it since."""

    info: PeerInfo
    first_seen: float  # monotonic
    last_alive: float  # monotonic: last mDNS update or successful health check
    failures: int  # consecutive failed health checks
    epoch: int  # plan epoch the peer reports (from health checks), 0 if none
    leads_epoch: int  # >0 when the peer says it is the coordinator of that epoch
    verified: bool = False  # a health check has succeeded since this registration was seen
    last_checked: float | None = None  # monotonic time of the last health check, if any


PeerTable = Mapping[str, PeerState]


def same_cluster(info: PeerInfo, cluster_id: str) -> bool:
    return info.cluster_id == cluster_id


def same_registration(a: PeerInfo, b: PeerInfo) -> bool:
    """Whether two adverts come from one running node (a TXT change keeps this true)."""
    return (a.node_id, a.instance, a.address, a.grpc_port, a.started_at) == (
        b.node_id,
        b.instance,
        b.address,
        b.grpc_port,
        b.started_at,
    )


def upsert(table: PeerTable, info: PeerInfo, now: float, cluster_id: str) -> dict[str, PeerState]:
    """Record an mDNS add or update. Adverts from another cluster never enter the table.

    An update of the same registration (e.g. a new model or budget in TXT) keeps the peer's
    health history; a different registration under a known node id (the node restarted,
    possibly elsewhere) starts over, since nothing learned about the old process holds.
    """
    updated = dict(table)
    if not same_cluster(info, cluster_id):
        return updated
    known = table.get(info.node_id)
    if known is not None and same_registration(known.info, info):
        updated[info.node_id] = replace(known, info=info, last_alive=max(known.last_alive, now))
    else:
        updated[info.node_id] = PeerState(
            info=info, first_seen=now, last_alive=now, failures=0, epoch=0, leads_epoch=0
        )
    return updated


def admit_missing(
    table: PeerTable, adverts: Iterable[PeerInfo], now: float, cluster_id: str
) -> dict[str, PeerState]:
    """Re-admit advertised peers that the table has dropped, leaving known peers untouched.

    mDNS announces a service once; a peer that expired while it was briefly unreachable would
    otherwise never come back. Unlike `upsert`, this does not refresh known peers, so feeding
    it the browser's full list every tick cannot keep a dead peer alive; a stale advert of a
    crashed node is re-admitted unverified, never becomes healthy, and expires again.
    """
    updated = dict(table)
    for info in adverts:
        if info.node_id not in updated:
            updated = upsert(updated, info, now, cluster_id)
    return updated


def remove_instance(table: PeerTable, instance: str) -> dict[str, PeerState]:
    """Drop the peer whose registration said goodbye (another registration under the same node
    id, e.g. its restarted process, is kept)."""
    return {node_id: state for node_id, state in table.items() if state.info.instance != instance}


def mark_alive(
    table: PeerTable, node_id: str, now: float, epoch: int, leads_epoch: int
) -> dict[str, PeerState]:
    """Record a successful health check and the plan epoch the peer reported."""
    updated = dict(table)
    known = table.get(node_id)
    if known is not None:
        updated[node_id] = replace(
            known,
            last_alive=max(known.last_alive, now),
            failures=0,
            epoch=epoch,
            leads_epoch=leads_epoch,
            verified=True,
            last_checked=now,
        )
    return updated


def mark_failed(table: PeerTable, node_id: str, now: float) -> dict[str, PeerState]:
    """Record a failed health check. It does not refresh `last_alive`, so expiry proceeds."""
    updated = dict(table)
    known = table.get(node_id)
    if known is not None:
        updated[node_id] = replace(known, failures=known.failures + 1, last_checked=now)
    return updated


def expire(table: PeerTable, now: float, timeout_s: float = PEER_TIMEOUT_S) -> dict[str, PeerState]:
    """Drop peers that nothing has shown alive for `timeout_s`."""
    return {
        node_id: state for node_id, state in table.items() if now - state.last_alive < timeout_s
    }


def is_healthy(state: PeerState) -> bool:
    return state.verified and state.failures < FAILURES_BEFORE_UNHEALTHY


def healthy(table: PeerTable) -> list[PeerInfo]:
    """The healthy peers' adverts, sorted by node id."""
    ordered = sorted(table.values(), key=lambda state: state.info.node_id)
    return [state.info for state in ordered if is_healthy(state)]


def registration_conflict(table: PeerTable, info: PeerInfo) -> PeerInfo | None:
    """The known advert that `info` would replace although it is a different registration of the
    same node id (a restart, or two live nodes sharing an id), or None."""
    known = table.get(info.node_id)
    if known is None or same_registration(known.info, info):
        return None
    return known.info
