"""Who is in the mesh: this node's mDNS advert, the peers it browses, and their health.

The table logic is pure (discovery/peers.py); this module feeds it events from zeroconf and
from a health check of every peer every second, measures round trips for the planner's
latencies, and keeps each peer's last health reply (the coordinator's carries its word on
the mesh: why no ring can serve, who is excluded). A peer that says goodbye leaves at once;
one that stops answering is unhealthy after two failed checks and gone after
discovery.peers.PEER_TIMEOUT_S. `on_change` is called whenever what the coordinator decides
on may have changed.

Construction does no I/O: `start()` opens zeroconf, advertises and starts the checks, so a
test can build a Membership and feed it adverts and health replies by hand.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from discovery import peers
from discovery.addresses import AddressChoice, Interface, choose_addresses
from discovery.election import duplicate_loser_info
from discovery.identity import replace_node_id
from discovery.mdns import Advertiser, Browser, open_zeroconf
from discovery.peers import PeerInfo, PeerState
from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring import auth, tcp

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 1.0
# The planner's hop latency to a peer: half the least round trip of the last LATENCY_SAMPLES
# (one a second, with the health check). A minimum, not an average: a busy moment (start-up,
# loading a model) only ever adds to a round trip, and it must not price the network (29.9 ms
# "hops" were measured on a busy machine whose quiet round trip was 0.4 ms). Round trips are
# timed on the data plane's TCP port (a connection's handshake), where frames travel, and on
# the health check itself (gRPC, whose Python round trip costs about 1 ms more than a hop
# does, so it counts only until the data port answers). A peer seen for the first time is
# pinged FIRST_CONTACT_PINGS times at once, so a plan made seconds later has samples.
LATENCY_SAMPLES = 30
FIRST_CONTACT_PINGS = 5


def one_way_latency_ms(round_trips_ms: Sequence[float]) -> float:
    """A hop's latency from measured round trips (ms): half the least; raises ValueError on
    no samples."""
    return min(round_trips_ms) / 2

HealthCheck = Callable[[PeerInfo], "pb.HealthReply | None"]


@dataclass(frozen=True)
class Addressing:
    """How this node picks its advertised addresses: pinned with --host, or chosen."""

    pinned: bool  # --host given: advertise exactly that address
    interfaces: tuple[Interface, ...] = ()  # this machine's interfaces, when not pinned
    default_route: str | None = None  # the source address of the default route, if any


class Membership:
    def __init__(self, me: PeerInfo, *, host: str | None, id_path: Path,
                 on_id_change: Callable[[str], None], addressing: Addressing,
                 on_change: Callable[[], None] = lambda: None,
                 on_address_change: Callable[[str], None] = lambda address: None,
                 health: HealthCheck | None = None) -> None:
        self.me = me
        self._host = host
        self._addressing = addressing
        self._lock = threading.Lock()
        self._table: dict[str, PeerState] = {}
        self._round_trips_ms: dict[str, deque[float]] = {}
        self._data_ports = tcp.DataPorts()
        self._replies: dict[str, pb.HealthReply] = {}
        self._other_clusters: dict[str, str] = {}  # cluster id -> first node seen there
        self._channels: dict[str, grpc.Channel] = {}
        self._id_path = id_path
        self._on_id_change = on_id_change
        self._on_change = on_change
        self._on_address_change = on_address_change
        self._health = health or self._grpc_health
        self._stop = threading.Event()
        self._advertiser: Advertiser | None = None
        self._browser: Browser | None = None
        self._zeroconf = None
        self._checker: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Advertise this node, browse for the others and check them every second."""
        choice = self._choice([])
        self._zeroconf = open_zeroconf(self._host)
        self._advertiser = Advertiser(self._zeroconf, choice.addresses)
        self.me = self._advertiser.register(replace(self.me, address=choice.primary))
        self._browser = Browser(self._zeroconf, self.on_add, self.on_remove,
                                local=self._addressing.interfaces)
        self._checker = ThreadPoolExecutor(max_workers=8, thread_name_prefix="health")
        self._thread = threading.Thread(target=self._check_forever, name="membership",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop checking and say goodbye over mDNS (peers drop this node at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3)
        if self._checker is not None:
            self._checker.shutdown(wait=False, cancel_futures=True)
        if self._browser is not None:
            self._browser.close()
        if self._advertiser is not None:
            self._advertiser.close()  # the goodbye
        if self._zeroconf is not None:
            self._zeroconf.close()
        for channel in list(self._channels.values()):
            channel.close()

    # ----- what the rest of the node reads ----------------------------------------------

    def states(self) -> list[PeerState]:
        with self._lock:
            return sorted(self._table.values(), key=lambda s: s.info.node_id)

    def healthy_states(self) -> list[PeerState]:
        return [state for state in self.states() if peers.is_healthy(state)]

    def latencies_ms(self) -> dict[str, float]:
        """Each peer's hop latency for the planner (`one_way_latency_ms`)."""
        with self._lock:
            return {node_id: one_way_latency_ms(samples)
                    for node_id, samples in self._round_trips_ms.items() if samples}

    def peer(self, node_id: str) -> PeerInfo | None:
        with self._lock:
            state = self._table.get(node_id)
        return state.info if state else None

    def health_of(self, node_id: str) -> pb.HealthReply | None:
        """The last health reply of a peer (None before the first, or once it is gone)."""
        with self._lock:
            return self._replies.get(node_id)

    def other_clusters(self) -> dict[str, str]:
        """Clusters with another key seen over mDNS: cluster id -> a node seen there."""
        with self._lock:
            return dict(self._other_clusters)

    def advertise(self, **changes: object) -> None:
        """Change this node's advert (e.g. the model it proposes)."""
        me = replace(self.me, **changes)
        self.me = self._advertiser.update(me) if self._advertiser is not None else me

    # ----- zeroconf events (browser worker thread) --------------------------------------

    def on_add(self, info: PeerInfo) -> None:
        if info.node_id == self.me.node_id:
            if info.instance != self.me.instance:
                self._resolve_duplicate(info)
            return
        if info.cluster_id != self.me.cluster_id:
            self._saw_other_cluster(info)
            return
        with self._lock:
            known = self._table.get(info.node_id)
            self._table = peers.upsert(self._table, info, time.monotonic(), self.me.cluster_id)
            added = info.node_id in self._table and known is None
        if added:
            log.info("discovered %s (%s) at %s", info.name, info.node_id, info.grpc_address)
        self._follow_peers()
        self._on_change()

    def on_remove(self, instance: str) -> None:
        with self._lock:
            gone = [s.info for s in self._table.values() if s.info.instance == instance]
            self._table = peers.remove_instance(self._table, instance)
            for info in gone:
                self._replies.pop(info.node_id, None)
        for info in gone:
            log.info("%s (%s) left the mesh", info.name, info.node_id)
        if gone:
            self._on_change()

    def _saw_other_cluster(self, info: PeerInfo) -> None:
        with self._lock:
            first = info.cluster_id not in self._other_clusters
            if first:
                self._other_clusters[info.cluster_id] = f"{info.name} at {info.address}"
        if first:
            log.warning("a dnet cluster with another cluster key is on the network (%s at %s, "
                        "cluster id %s); its nodes are ignored. Give every node the same "
                        "--cluster-key to join them.", info.name, info.address,
                        info.cluster_id)

    def _resolve_duplicate(self, other: PeerInfo) -> None:
        """Two live nodes share an id (a cloned machine): the junior takes a new one."""
        loser = duplicate_loser_info(self.me, other)
        if loser is None or loser.instance != self.me.instance:
            return
        new_id = replace_node_id(self._id_path)
        log.warning("node id %s is also used by %s at %s; this node is now %s",
                    self.me.node_id, other.name, other.grpc_address, new_id)
        self.advertise(node_id=new_id)
        self._on_id_change(new_id)

    # ----- the address this node goes by ------------------------------------------------

    def _choice(self, peer_addresses: Sequence[str]) -> AddressChoice:
        addressing = self._addressing
        if addressing.pinned:
            return AddressChoice((self.me.address,), self.me.address)
        return choose_addresses(addressing.interfaces, addressing.default_route,
                                peer_addresses)

    def _follow_peers(self) -> None:
        """Make the primary address the one sharing a subnet with most peers."""
        if self._addressing.pinned:
            return
        choice = self._choice([s.info.address for s in self.states()])
        if choice.primary == self.me.address:
            return
        log.info("advertising %s as this node's address: the peers are on its network",
                 choice.primary)
        if self._advertiser is not None:
            self._advertiser.addresses = choice.addresses
        self.advertise(address=choice.primary)
        self._on_address_change(choice.primary)

    # ----- health checks -------------------------------------------------------------------

    def _check_forever(self) -> None:
        while not self._stop.wait(peers.HEALTH_CHECK_INTERVAL_S):
            self.check_round()

    def check_round(self) -> None:
        """Check every peer once, update the table, and report what changed."""
        before = self._signature()
        now = time.monotonic()
        known = self._browser.known() if self._browser is not None else []
        with self._lock:
            self._table = peers.admit_missing(self._table, [
                info for info in known if info.node_id != self.me.node_id
            ], now, self.me.cluster_id)
            targets = [state.info for state in self._table.values()]
        mapper = self._checker.map if self._checker is not None else map
        results = list(mapper(self._health_or_none, targets))
        self.apply_health(list(zip(targets, results, strict=True)), time.monotonic())
        if self._signature() != before:
            self._on_change()

    def apply_health(self, results: list[tuple[PeerInfo, pb.HealthReply | None]],
                     now: float) -> None:
        """Record one round of health-check results at monotonic time `now`."""
        with self._lock:
            for info, reply in results:
                if reply is None:
                    was = self._table.get(info.node_id)
                    self._table = peers.mark_failed(self._table, info.node_id, now)
                    if was is not None and peers.is_healthy(was) and not peers.is_healthy(
                            self._table[info.node_id]):
                        log.warning("%s (%s) stopped answering", info.name, info.node_id)
                else:
                    self._table = peers.mark_alive(self._table, info.node_id, now,
                                                   reply.epoch, reply.leads_epoch)
                    self._replies[info.node_id] = reply
            before = {node_id: s.verified for node_id, s in self._table.items()}
            self._table = peers.expire(self._table, now)
            for node_id in set(before) - set(self._table):
                self._round_trips_ms.pop(node_id, None)
                self._replies.pop(node_id, None)
                if before[node_id]:  # an unverified re-admission leaving is no news
                    log.info("dropped %s: not seen for %.0f s", node_id, peers.PEER_TIMEOUT_S)

    def _signature(self) -> tuple:
        """What the coordinator decides on: the healthy peers, their adverts and epochs."""
        with self._lock:
            return tuple(sorted((node_id, (s.info, s.epoch, s.leads_epoch))
                                for node_id, s in self._table.items() if peers.is_healthy(s)))

    def _health_or_none(self, info: PeerInfo) -> pb.HealthReply | None:
        try:
            return self._health(info)
        except Exception:  # a check that breaks counts as a failed check
            log.exception("health check of %s failed", info.grpc_address)
            return None

    def _grpc_health(self, info: PeerInfo) -> pb.HealthReply | None:
        channel = self._channels.get(info.grpc_address)
        if channel is None:
            channel = auth.channel(info.grpc_address)
            self._channels[info.grpc_address] = channel
        with self._lock:
            first_contact = info.node_id not in self._round_trips_ms
        reply = None
        for _ in range(FIRST_CONTACT_PINGS if first_contact else 1):
            started = time.perf_counter()
            try:
                reply = pb_grpc.RingStub(channel).Health(pb.HealthRequest(),
                                                         timeout=HEALTH_TIMEOUT_S)
            except grpc.RpcError:
                return None
            if reply.node_id != info.node_id:
                return None  # someone else answers at that address now
            self.record_round_trip(info.node_id, (time.perf_counter() - started) * 1000)
            data_round_trip = self._data_round_trip_ms(info.grpc_address)
            if data_round_trip is not None:
                self.record_round_trip(info.node_id, data_round_trip)
        return reply

    def _data_round_trip_ms(self, grpc_address: str) -> float | None:
        """A TCP handshake with the peer's data plane, in ms; None when it does not answer."""
        host = grpc_address.rsplit(":", 1)[0]
        try:
            port = self._data_ports.port(grpc_address)
            started = time.perf_counter()
            with socket.create_connection((host, port), timeout=HEALTH_TIMEOUT_S):
                return (time.perf_counter() - started) * 1000
        except OSError:  # ConnectionError too: no data plane there (yet), or another port now
            self._data_ports.forget(grpc_address)
            return None

    def record_round_trip(self, node_id: str, round_trip_ms: float) -> None:
        """One measured round trip to a peer (ms)."""
        with self._lock:
            self._round_trips_ms.setdefault(
                node_id, deque(maxlen=LATENCY_SAMPLES)).append(round_trip_ms)
