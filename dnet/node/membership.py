"""Who is in the mesh: this node's mDNS advert, the peers it browses, and their health.

The table logic is pure (discovery/peers.py); this module feeds it events from zeroconf and
from a health check every second, and measures round trips for the planner's latencies.
A peer that says goodbye leaves at once; one that stops answering is unhealthy after two
failed checks and gone after discovery.peers.PEER_TIMEOUT_S.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc

from discovery import peers
from discovery.election import duplicate_loser_info
from discovery.identity import replace_node_id
from discovery.mdns import Advertiser, Browser, open_zeroconf
from discovery.peers import PeerInfo, PeerState
from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring import auth

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 1.0


class Membership:
    def __init__(self, me: PeerInfo, *, host: str | None, id_path: Path,
                 on_id_change: Callable[[str], None]) -> None:
        self._lock = threading.Lock()
        self._table: dict[str, PeerState] = {}
        self._latency_ms: dict[str, float] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._id_path = id_path
        self._on_id_change = on_id_change
        self._zeroconf = open_zeroconf(host)
        self._advertiser = Advertiser(self._zeroconf)
        self.me = self._advertiser.register(me)
        self._browser = Browser(self._zeroconf, self._on_add, self._on_remove)
        self._checker = ThreadPoolExecutor(max_workers=8, thread_name_prefix="health")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._check_forever, name="membership",
                                        daemon=True)
        self._thread.start()

    # ----- what the rest of the node reads ----------------------------------------------

    def states(self) -> list[PeerState]:
        with self._lock:
            return sorted(self._table.values(), key=lambda s: s.info.node_id)

    def healthy_states(self) -> list[PeerState]:
        return [state for state in self.states() if peers.is_healthy(state)]

    def latencies_ms(self) -> dict[str, float]:
        with self._lock:
            return dict(self._latency_ms)

    def peer(self, node_id: str) -> PeerInfo | None:
        with self._lock:
            state = self._table.get(node_id)
        return state.info if state else None

    def advertise(self, **changes: object) -> None:
        """Change this node's advert (e.g. the model it proposes)."""
        self.me = self._advertiser.update(replace(self.me, **changes))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)
        self._checker.shutdown(wait=False, cancel_futures=True)
        self._browser.close()
        self._advertiser.close()  # the mDNS goodbye: peers drop us at once
        self._zeroconf.close()
        for channel in self._channels.values():
            channel.close()

    # ----- zeroconf events (browser worker thread) --------------------------------------

    def _on_add(self, info: PeerInfo) -> None:
        if info.node_id == self.me.node_id:
            if info.instance != self.me.instance:
                self._resolve_duplicate(info)
            return
        with self._lock:
            known = self._table.get(info.node_id)
            self._table = peers.upsert(self._table, info, time.monotonic(), self.me.cluster_id)
            added = info.node_id in self._table and known is None
        if added:
            log.info("discovered %s (%s) at %s", info.name, info.node_id, info.grpc_address)

    def _on_remove(self, instance: str) -> None:
        with self._lock:
            gone = [s.info for s in self._table.values() if s.info.instance == instance]
            self._table = peers.remove_instance(self._table, instance)
        for info in gone:
            log.info("%s (%s) left the mesh", info.name, info.node_id)

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

    # ----- health checks -------------------------------------------------------------------

    def _check_forever(self) -> None:
        while not self._stop.wait(peers.HEALTH_CHECK_INTERVAL_S):
            now = time.monotonic()
            with self._lock:
                self._table = peers.admit_missing(self._table, [
                    info for info in self._browser.known() if info.node_id != self.me.node_id
                ], now, self.me.cluster_id)
                targets = [state.info for state in self._table.values()]
            results = list(self._checker.map(self._check, targets))
            now = time.monotonic()
            with self._lock:
                for info, reply in zip(targets, results, strict=True):
                    if reply is None:
                        was = self._table.get(info.node_id)
                        self._table = peers.mark_failed(self._table, info.node_id, now)
                        if was is not None and peers.is_healthy(was) and not peers.is_healthy(
                                self._table[info.node_id]):
                            log.warning("%s (%s) stopped answering", info.name, info.node_id)
                    else:
                        self._table = peers.mark_alive(self._table, info.node_id, now,
                                                       reply.epoch, reply.leads_epoch)
                before = {node_id: s.verified for node_id, s in self._table.items()}
                self._table = peers.expire(self._table, now)
                for node_id in set(before) - set(self._table):
                    self._latency_ms.pop(node_id, None)
                    if before[node_id]:  # an unverified re-admission leaving is no news
                        log.info("dropped %s: not seen for %.0f s", node_id,
                                 peers.PEER_TIMEOUT_S)

    def _check(self, info: PeerInfo) -> pb.HealthReply | None:
        channel = self._channels.get(info.grpc_address)
        if channel is None:
            channel = auth.channel(info.grpc_address)
            self._channels[info.grpc_address] = channel
        started = time.perf_counter()
        try:
            reply = pb_grpc.RingStub(channel).Health(pb.HealthRequest(),
                                                     timeout=HEALTH_TIMEOUT_S)
        except grpc.RpcError:
            return None
        if reply.node_id != info.node_id:
            return None  # someone else answers at that address now
        round_trip_ms = (time.perf_counter() - started) * 1000
        with self._lock:
            previous = self._latency_ms.get(info.node_id, round_trip_ms / 2)
            self._latency_ms[info.node_id] = 0.7 * previous + 0.3 * round_trip_ms / 2
        return reply
