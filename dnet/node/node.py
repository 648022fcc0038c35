"""`dnet join`: one mesh node. It advertises itself, finds peers, takes part in the election,
holds whatever layers the coordinator gives it, and answers the HTTP API as an entry node.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import uvicorn

from discovery.identity import cluster_id, load_or_create_node_id
from discovery.peers import PeerInfo
from dnet import __version__
from dnet.entry import RingEntry, local_address_towards
from dnet.node import profiling
from dnet.node.coordinator import Coordinator, CoordinatorOptions
from dnet.node.host import EpochHost
from dnet.node.membership import Membership
from dnet.node.service import ControlService, NodeRingService
from dnet.plan_cli import ModelResolutionError, resolve_model_profile
from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring import auth
from dnet.ring.links import start_server

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JoinOptions:
    model: str = ""
    name: str = ""
    host: str | None = None  # None: every interface, advertising the LAN address
    http_port: int = 8080
    grpc_port: int = 50501
    memory_budget_bytes: int | None = None
    cluster_key: str | None = None
    state_dir: Path = Path("~/.config/dnet")
    kv_ttl_s: float = 300.0
    context_tokens: int = 4096
    kv_cap_bytes: int | None = None
    max_requests: int = 64
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ("*",)
    special_tokens_in_messages: bool = False


class Node:
    def __init__(self, options: JoinOptions) -> None:
        self.options = options
        state_dir = options.state_dir.expanduser()
        # One id file per gRPC port: several nodes on one machine are distinct nodes, while
        # a cloned machine carries the same file and is told apart by duplicate detection.
        self._id_path = state_dir / f"node-{options.grpc_port}.id"
        self.node_id = load_or_create_node_id(self._id_path)
        self.started_at = time.time()
        self.address = options.host or local_address_towards("192.0.2.1")
        # No plan yet: requests wait for the first one. A request a dying node fails is
        # replayed on the new ring.
        self.entry = RingEntry(head="", address=f"{self.address}:{options.grpc_port}",
                               admitting=False, recover=True,
                               max_requests=options.max_requests)
        self.host = EpochHost(self.node_id, self.entry, kv_ttl_s=options.kv_ttl_s,
                              kv_cap_bytes=options.kv_cap_bytes)
        self._device: pb.DeviceInfo | None = None
        self._stopping = threading.Event()
        self.coordinator: Coordinator | None = None  # peers may ask before it exists
        bind = options.host or "0.0.0.0"
        self.grpc_server, _ = start_server(self._services(), bind, options.grpc_port)
        budget = options.memory_budget_bytes or profiling.default_memory_budget()
        me = PeerInfo(
            node_id=self.node_id, name=options.name or f"dnet-{self.node_id[:6]}",
            address=self.address, grpc_port=options.grpc_port, http_port=options.http_port,
            memory_budget_bytes=budget, started_at=self.started_at, version=__version__,
            platform=profiling.platform_name(), chip=profiling.chip_name(),
            cluster_id=cluster_id(options.cluster_key), model=options.model, instance="",
        )
        threading.Thread(target=self._measure, args=(budget,), name="measure",
                         daemon=True).start()
        self.membership = Membership(me, host=options.host, id_path=self._id_path,
                                     on_id_change=self._id_changed)
        self.coordinator = Coordinator(
            self.host, self.membership, proposed_model=options.model,
            started_at=self.started_at,
            options=CoordinatorOptions(context_tokens=options.context_tokens),
            stopped=self._stopping.is_set)
        self.coordinator.start()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="status")
        log.info("node %s (%s) joined: gRPC %s:%d, HTTP %s:%d, memory budget %s",
                 me.name, self.node_id, self.address, options.grpc_port, self.address,
                 options.http_port, profiling.format_bytes(budget))

    def _services(self) -> list[tuple]:
        return [(pb_grpc.add_RingServicer_to_server, NodeRingService(self)),
                (pb_grpc.add_ControlServicer_to_server, ControlService(self))]

    # ----- lifecycle -----------------------------------------------------------------------

    def serve_http(self) -> None:
        """Serve the HTTP API until interrupted (uvicorn handles SIGINT and SIGTERM)."""
        from dnet.node.api import create_node_app

        app = create_node_app(self)
        bind = self.options.host or "0.0.0.0"
        log.info("ready: http://%s:%d", self.address, self.options.http_port)
        uvicorn.run(app, host=bind, port=self.options.http_port, log_level="warning")

    def close(self) -> None:
        self._stopping.set()
        self.membership.close()
        self.grpc_server.stop(grace=1)
        self.host.stop()
        self.entry.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ----- called by the services and the API --------------------------------------------

    def leads_epoch(self) -> int:
        coordinator = self.coordinator
        return coordinator.leads_epoch if coordinator is not None and coordinator.is_me else 0

    def device_info(self) -> pb.DeviceInfo | None:
        if self._device is None:
            return None
        info = pb.DeviceInfo()
        info.CopyFrom(self._device)
        info.node_id = self.node_id
        info.peer_latency_ms.update(self.membership.latencies_ms())
        return info

    def status(self) -> pb.NodeStatus:
        runtime = self.host.runtime
        member = self.host.my_member()
        stage = runtime.stage if runtime is not None and runtime.ready else None
        return pb.NodeStatus(
            node_id=self.node_id, name=self.membership.me.name, epoch=self.host.epoch,
            model=self.host.plan.model if self.host.plan else "",
            layers=list(member.layers) if member else [],
            window=member.window if member else 0,
            streaming=bool(stage and stage.streaming),
            memory_used_bytes=profiling.memory_used_bytes(),
            memory_budget_bytes=self.membership.me.memory_budget_bytes,
            decode_tokens_per_s=self.entry.stats.tokens_per_s,
            active_requests=self.entry.active_requests,
            ready=self.host.plan is not None,
        )

    def load_model(self, model: str) -> str:
        """Switch the cluster's model, through the coordinator; returns an error or ""."""
        coordinator = self.coordinator.coordinator_id if self.coordinator else None
        if coordinator is None:
            return "no coordinator is elected yet"
        if coordinator == self.node_id:
            try:
                resolve_model_profile(model)
            except ModelResolutionError as exc:
                return str(exc)
            return self.coordinator.load_model(model)
        peer = self.membership.peer(coordinator)
        if peer is None:
            return f"the coordinator {coordinator} is not reachable"
        with auth.channel(peer.grpc_address) as channel:
            try:
                reply = pb_grpc.ControlStub(channel).LoadModel(
                    pb.LoadModelRequest(model=model), timeout=900)
            except grpc.RpcError as exc:
                return f"the coordinator failed: {exc.code().name}: {exc.details()}"
        return reply.error

    def peer_statuses(self, addresses: list[str]) -> dict[str, pb.NodeStatus]:
        def one(address: str) -> tuple[str, pb.NodeStatus | None]:
            if address == self.entry.address:
                return address, self.status()
            with auth.channel(address) as channel:
                try:
                    return address, pb_grpc.ControlStub(channel).Status(
                        pb.StatusRequest(), timeout=1.0)
                except grpc.RpcError:
                    return address, None

        return {a: s for a, s in self._pool.map(one, addresses) if s is not None}

    # ----- internals -----------------------------------------------------------------------

    def _measure(self, budget: int) -> None:
        flops = profiling.measure_flops()
        disk = profiling.measure_disk_read()
        self._device = pb.DeviceInfo(
            flops=flops, disk_read_bytes_per_s=disk, memory_budget_bytes=budget,
            chip=profiling.chip_name(), platform=profiling.platform_name())
        log.info("measured this device: %.1f GFLOP/s decode, disk %.1f GB/s", flops / 1e9,
                 disk / 1e9)

    def _id_changed(self, new_id: str) -> None:
        self.node_id = new_id
        self.host.node_id = new_id
