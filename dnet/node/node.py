"""`dnet join`: one mesh node. It advertises itself, finds peers, takes part in the election,
holds whatever layers the coordinator gives it, and answers the HTTP API as an entry node.

Building a `Node` starts nothing (no socket, no thread), so tests build one in-process with
fakes. `start()` binds both ports before anything is advertised (a taken port ends the
process before a peer hears of it), then measures, advertises and coordinates. `serve(stop)`
answers HTTP until `stop` is set, then shuts down within SHUTDOWN_S: stop admitting, let
requests in flight end for DRAIN_S, fail the rest with an error chunk, say goodbye over mDNS.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from discovery.addresses import choose_addresses
from discovery.identity import cluster_id, load_or_create_node_id
from discovery.mdns import local_interfaces, resolve_ipv4
from discovery.peers import PeerInfo
from dnet import __version__
from dnet.entry import DEFAULT_MAX_REQUESTS, PREFILL_CHUNK, RingEntry, local_address_towards
from dnet.node import profiling
from dnet.node.control import Unavailable, UnavailableKind
from dnet.node.coordinator import Coordinator, CoordinatorOptions, LoadFailed
from dnet.node.host import EpochHost, LoadRuntime, Runtime
from dnet.node.membership import Addressing, HealthCheck, Membership
from dnet.node.rollout import ControlClient, GrpcControlClient, Rollout
from dnet.node.service import ControlService, NodeRingService
from dnet.node.sizes import format_bytes
from dnet.plan_cli import ModelResolutionError, resolve_model_profile
from dnet.prefix.budget import DEFAULT_SHARE, default_capacity
from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring import auth
from dnet.ring.links import listen_socket, start_server
from dnet.shard.decisions import DEFAULT_KV_TTL_S
from dnet.shard.router import Router
from planner.devices import DEFAULT_CONTEXT_TOKENS

log = logging.getLogger(__name__)

DRAIN_S = 2.0  # on shutdown, requests in flight get this long to end before they fail
SHUTDOWN_S = 4.5  # past this the process exits whatever is still running
LOAD_TIMEOUT_S = 900.0
INTERNET_PROBE = "192.0.2.1"  # TEST-NET-1: only routed by a default route; nothing is sent


@dataclass(frozen=True)
class JoinOptions:
    model: str = ""
    name: str = ""
    host: str | None = None  # None: every interface, advertising those that reach the peers
    http_port: int = 8080
    grpc_port: int = 50501
    memory_budget_bytes: int | None = None
    cluster_key: str | None = None
    state_dir: Path = Path("~/.config/dnet")
    kv_ttl_s: float = DEFAULT_KV_TTL_S
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    kv_cap_bytes: int | None = None
    prefix_cache_bytes: int | None = None  # None: what the plan leaves, up to a share
    prefill_chunk: int = PREFILL_CHUNK
    max_requests: int = DEFAULT_MAX_REQUESTS
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ("*",)
    special_tokens_in_messages: bool = False


def planned_bytes(plan: pb.PlanRequest, node_id: str, budget: int) -> int:
    """The memory `plan` fills on node `node_id` (weights, KV cache for the context); the
    whole budget when the plan does not say."""
    devices = json.loads(plan.plan_json).get("devices", []) if plan.plan_json else []
    mine = next((d for d in devices if d.get("id") == node_id), None)
    return int(mine["memory_bytes"]) if mine and "memory_bytes" in mine else budget


def machine_addressing(host: str | None) -> Addressing:
    """This machine's interfaces and default route; `host` pins the address (--host)."""
    interfaces = tuple(local_interfaces())
    if host is not None:
        return Addressing(pinned=True, interfaces=interfaces)
    route = local_address_towards(INTERNET_PROBE)
    return Addressing(pinned=False, interfaces=interfaces,
                      default_route=None if route.startswith("127.") else route)


class Node:
    def __init__(self, options: JoinOptions, *, addressing: Addressing | None = None,
                 control: ControlClient | None = None, load_runtime: LoadRuntime | None = None,
                 health: HealthCheck | None = None) -> None:
        self.options = options
        state_dir = options.state_dir.expanduser()
        # One id file per gRPC port: several nodes on one machine are distinct nodes, while
        # a cloned machine carries the same file and is told apart by duplicate detection.
        self._id_path = state_dir / f"node-{options.grpc_port}.id"
        self.node_id = load_or_create_node_id(self._id_path)
        self.started_at = time.time()
        self.bind = resolve_ipv4(options.host) if options.host else "0.0.0.0"
        addressing = addressing or machine_addressing(options.host)
        self.address = self.bind if addressing.pinned else choose_addresses(
            addressing.interfaces, addressing.default_route).primary
        # No plan yet: requests wait for the first one. A request a dying node fails is
        # replayed on the new ring.
        self.entry = RingEntry(head="", address=f"{self.address}:{options.grpc_port}",
                               admitting=False, recover=True, max_requests=options.max_requests,
                               prefill_chunk=options.prefill_chunk)
        self.host = EpochHost(self.node_id, self.entry,
                              load_runtime=load_runtime or self._load_runtime,
                              on_commit=self._committed)
        self._stopping = threading.Event()
        self._measured = threading.Event()
        self._device: pb.DeviceInfo | None = None
        self._profiles: dict[str, str] = {}  # model -> planner profile JSON
        budget = options.memory_budget_bytes or profiling.default_memory_budget()
        me = PeerInfo(
            node_id=self.node_id, name=options.name or f"dnet-{self.node_id[:6]}",
            address=self.address, grpc_port=options.grpc_port, http_port=options.http_port,
            memory_budget_bytes=budget, started_at=self.started_at, version=__version__,
            platform=profiling.platform_name(), chip=profiling.chip_name(),
            cluster_id=cluster_id(options.cluster_key), model=options.model, instance="",
        )
        self.membership = Membership(me, host=self.bind if options.host else None,
                                     id_path=self._id_path,
                                     on_id_change=self._id_changed, addressing=addressing,
                                     on_change=self._membership_changed,
                                     on_address_change=self._address_changed, health=health)
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="control")
        self.coordinator = Coordinator(
            self.host, self.membership, Rollout(control or GrpcControlClient(), self._pool),
            proposed_model=options.model, started_at=self.started_at,
            options=CoordinatorOptions(context_tokens=options.context_tokens))
        self.grpc_server: grpc.Server | None = None
        self.http_socket: socket.socket | None = None
        self._ambiguous = choose_addresses(addressing.interfaces, addressing.default_route
                                           ).ambiguous if not addressing.pinned else ()

    # ----- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Bind the gRPC and HTTP ports (exclusively), then measure, advertise, coordinate.

        Raises PortInUse (naming the port) or OSError before anything is advertised."""
        self.grpc_server, _ = start_server(self._services(), self.bind, self.options.grpc_port)
        try:
            self.http_socket = listen_socket(self.bind, self.options.http_port)
        except OSError:
            self.grpc_server.stop(grace=None)
            raise
        if self._ambiguous:
            log.warning("this machine has several network interfaces (%s) and no --host: "
                        "advertising all of them; peers dial the one on their network, and "
                        "this node goes by the one most peers share. Pin one with --host.",
                        ", ".join(i.describe() for i in self._ambiguous))
        threading.Thread(target=self._measure, name="measure", daemon=True).start()
        self.membership.start()
        self.coordinator.start()
        me = self.membership.me
        log.info("node %s (%s) joined: gRPC %s:%d, HTTP %s:%d, memory budget %s",
                 me.name, self.node_id, me.address, self.options.grpc_port, me.address,
                 self.options.http_port, format_bytes(me.memory_budget_bytes))

    def serve(self, stop: threading.Event) -> None:
        """Answer HTTP until `stop` is set, then shut down (see the module's docstring)."""
        import uvicorn

        from dnet.node.api import create_node_app

        config = uvicorn.Config(create_node_app(self), log_level="warning",
                                timeout_graceful_shutdown=1)
        server = uvicorn.Server(config)
        # Not the main thread: uvicorn leaves the signals to `dnet join`'s handlers.
        thread = threading.Thread(target=server.run, kwargs={"sockets": [self.http_socket]},
                                  name="http", daemon=True)
        thread.start()
        log.info("ready: http://%s:%d", self.membership.me.address, self.options.http_port)
        stop.wait()
        self.shut_down()
        server.should_exit = True
        thread.join(timeout=2)
        self.close()

    def shut_down(self) -> None:
        """Stop admitting; let requests in flight end for DRAIN_S, then fail the rest."""
        self._stopping.set()
        active = self.entry.active_requests
        if active:
            log.info("shutting down: waiting up to %.0f s for %d request(s) in flight",
                     DRAIN_S, active)
        failed = self.entry.shut_down(DRAIN_S, "this node is shutting down; please retry")
        if failed:
            log.warning("shutting down: ended %d request(s) still in flight with an error",
                        failed)

    def close(self) -> None:
        self._stopping.set()
        self.coordinator.stop()
        self.membership.close()  # the mDNS goodbye: peers drop this node at once
        if self.grpc_server is not None:
            self.grpc_server.stop(grace=0.5)
        self.host.stop()
        self.entry.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _services(self) -> list[tuple]:
        return [(pb_grpc.add_RingServicer_to_server, NodeRingService(self)),
                (pb_grpc.add_ControlServicer_to_server, ControlService(self))]

    # ----- called by the services and the API --------------------------------------------

    def leads_epoch(self) -> int:
        coordinator = self.coordinator
        return coordinator.leads_epoch if coordinator.is_me else 0

    def device_info(self, model: str = "", timeout_s: float = 30.0) -> pb.DeviceInfo | None:
        """This device's measurements (waiting for them up to `timeout_s`), plus the profile
        of `model` when asked (or why it cannot be read here). None if not measured yet."""
        if not self._measured.wait(timeout_s) or self._device is None:
            return None
        info = pb.DeviceInfo()
        info.CopyFrom(self._device)
        info.node_id = self.node_id
        info.peer_latency_ms.update(self.membership.latencies_ms())
        if model:
            try:
                info.model_profile_json = self._profile(model)
            except (ModelResolutionError, OSError, ValueError) as exc:
                info.model_error = str(exc)
        return info

    def status(self) -> pb.NodeStatus:
        runtime = self.host.runtime
        member = self.host.my_member()
        stage = runtime.stage if runtime is not None and runtime.ready else None
        running = self.coordinator.running() if self.coordinator.is_me else None
        prefix = runtime.prefix_stats if stage is not None and runtime is not None else None
        hit_rate = prefix.hit_rate if prefix is not None else None
        return pb.NodeStatus(
            prefix_cache_bytes=prefix.nbytes if prefix else 0,
            prefix_cache_capacity_bytes=prefix.capacity_bytes if prefix else 0,
            prefix_cache_hit_rate=-1.0 if hit_rate is None else hit_rate,
            running_plan=running,
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

    def coordinator_word(self) -> pb.HealthReply:
        """The coordinator's word on the mesh (why no ring can serve, who is excluded), for
        this node's health replies when it coordinates; empty otherwise."""
        reply = pb.HealthReply()
        coordinator = self.coordinator
        if not coordinator.is_me:
            return reply
        infos = [self.membership.me, *(s.info for s in self.membership.healthy_states())]
        verdict = coordinator.unavailable(infos)
        if verdict is not None:
            reply.unavailable = verdict.message
            reply.unavailable_kind = pb.UnavailableKind.Value(verdict.kind.name)
        for node_id, exclusion in sorted(coordinator.exclusions().items()):
            reply.excluded.add(
                node_id=node_id, failure=pb.FailureKind.Value(exclusion.failure.kind.name),
                reason=exclusion.failure.message, failures=exclusion.failures,
                retry_in_s=coordinator.retry_in_s(exclusion))
        return reply

    def mesh_word(self) -> pb.HealthReply | None:
        """The coordinator's word, whether this node or a peer coordinates (None when no
        coordinator has answered yet)."""
        coordinator = self.coordinator.coordinator_id
        if coordinator is None:
            return None
        if coordinator == self.node_id:
            return self.coordinator_word()
        return self.membership.health_of(coordinator)

    def unavailable(self) -> Unavailable | None:
        """Why this node cannot serve a request now, the same on every node; None if it can.

        A node with a committed plan serves while the coordinator says a ring does (its entry
        waits out a re-plan); otherwise the reason is the coordinator's: the memory shortfall,
        no model chosen, every node excluded, or a plan on its way."""
        if self.stopping:
            return Unavailable(UnavailableKind.SHUTTING_DOWN,
                               "this node is shutting down; please retry on another node")
        word = self.mesh_word()
        if word is None:  # no coordinator, or none has answered a health check yet
            if self.host.served is not None:
                return None  # the entry waits for the next ring
            return Unavailable(UnavailableKind.NO_COORDINATOR,
                               "no coordinator is elected yet; please retry")
        kind = UnavailableKind[pb.UnavailableKind.Name(word.unavailable_kind)] if (
            word.unavailable_kind) else UnavailableKind.REPLANNING
        if self.host.served is not None and (not word.unavailable
                                             or kind is UnavailableKind.REPLANNING):
            return None  # the entry waits for the re-planned ring
        if word.unavailable:
            return Unavailable(kind, word.unavailable)
        mine = next((e for e in word.excluded if e.node_id == self.node_id), None)
        if mine is not None:
            return Unavailable(UnavailableKind.NO_NODE,
                               f"this node is left out of the mesh: {mine.reason}")
        return Unavailable(UnavailableKind.JOINING,
                           "this node has not joined a plan yet; please retry")

    def load_model(self, model: str) -> None:
        """Switch the cluster's model, through the coordinator; raises LoadFailed."""
        coordinator = self.coordinator.coordinator_id
        if coordinator is None:
            raise LoadFailed("no coordinator is elected yet")
        if coordinator == self.node_id:
            self.coordinator.load_model(model, LOAD_TIMEOUT_S)
            return
        peer = self.membership.peer(coordinator)
        if peer is None:
            raise LoadFailed(f"the coordinator {coordinator} is not reachable")
        with auth.channel(peer.grpc_address) as channel:
            try:
                reply = pb_grpc.ControlStub(channel).LoadModel(
                    pb.LoadModelRequest(model=model), timeout=LOAD_TIMEOUT_S + 30)
            except grpc.RpcError as exc:
                raise LoadFailed(f"the coordinator failed: {exc.code().name}: "
                                 f"{exc.details()}") from None
        if not reply.ok:
            raise LoadFailed(reply.error)

    def mesh_plan(self, statuses: dict[str, pb.NodeStatus]) -> pb.PlanRequest | None:
        """The plan the mesh runs: this node's, or the coordinator's when newer (a node left
        out of the plan, or one that just joined, shows the ring the others run)."""
        plans = [self.host.plan, *(s.running_plan for s in statuses.values()
                                   if s.HasField("running_plan"))]
        return max((p for p in plans if p is not None), key=lambda p: p.epoch, default=None)

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

    def _measure(self) -> None:
        try:
            flops = profiling.measure_flops()
            disk = profiling.measure_disk_read()
            self._device = pb.DeviceInfo(
                flops=flops, disk_read_bytes_per_s=disk,
                memory_budget_bytes=self.membership.me.memory_budget_bytes,
                prefix_cache_bytes=self.options.prefix_cache_bytes or 0,
                chip=profiling.chip_name(), platform=profiling.platform_name())
            log.info("measured this device: %.1f GFLOP/s decode, disk %.1f GB/s", flops / 1e9,
                     disk / 1e9)
        finally:
            self._measured.set()

    def _profile(self, model: str) -> str:
        if model not in self._profiles:
            self._profiles[model] = json.dumps(resolve_model_profile(model).to_dict())
        return self._profiles[model]

    def _load_runtime(self, model: str, layers: tuple[int, ...], window: int, router: Router,
                      epoch: int) -> Runtime:
        from dnet.model_files import resolve_for_layers
        from dnet.shard.runtime import ShardRuntime
        from dnet.stage import Stage

        model_dir = resolve_for_layers(model, layers)
        # Without --prefix-cache-bytes the cache is sized at commit, from the plan.
        runtime = ShardRuntime(lambda: Stage(model_dir, list(layers), window=window or None),
                               router, model_name=model, kv_ttl_s=self.options.kv_ttl_s,
                               epoch=epoch, kv_cap_bytes=self.options.kv_cap_bytes,
                               prefix_cache_bytes=self.options.prefix_cache_bytes or 0)
        runtime.start()
        return runtime

    def _committed(self, plan: pb.PlanRequest, runtime: Runtime | None) -> None:
        """A plan is committed: size the prefix cache from it unless the flag did."""
        if runtime is None or self.options.prefix_cache_bytes is not None:
            return
        budget = self.membership.me.memory_budget_bytes
        capacity = default_capacity(budget, planned_bytes(plan, self.node_id, budget))
        runtime.set_prefix_capacity(capacity)
        log.info("prefix cache: %s (what the plan leaves of this node's budget, up to 1/%d)",
                 format_bytes(capacity), DEFAULT_SHARE)

    def _membership_changed(self) -> None:
        self.coordinator.wake()

    def _address_changed(self, address: str) -> None:
        self.address = address
        self.entry.readdress(f"{address}:{self.options.grpc_port}")

    def _id_changed(self, new_id: str) -> None:
        self.node_id = new_id
        self.host.node_id = new_id
