"""The coordinator, its rollout and every node's EpochHost in one process: a fake control
client calls the hosts directly, a fake clock drives the back-offs. No sockets, no threads
besides the rollout's pool."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest

from discovery.election import RE_PLAN_QUIET_S
from discovery.peers import PeerInfo, PeerState
from dnet.local_ring import free_port
from dnet.node import control
from dnet.node.control import FailureKind, UnavailableKind
from dnet.node.coordinator import Coordinator, CoordinatorOptions, LoadFailed
from dnet.node.host import EpochHost, PrepareError, ServedModel
from dnet.node.rollout import GrpcControlClient, NodeFailed, NodeFailure, Rollout
from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring.links import start_server
from planner import uniform_profile
from tests.discovery.strategies import peer_info
from tests.test_mesh_host import FakeEntry, Loader

MODEL = "/models/m"
MIB = 1 << 20
PROFILE = json.dumps(uniform_profile(
    name=MODEL, num_layers=4, bytes_per_layer=MIB, flops_per_token_per_layer=2e6,
    kv_bytes_per_token_per_layer=16, embedding_bytes=MIB, head_bytes=MIB).to_dict())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Node:
    info: PeerInfo
    host: EpochHost
    entry: FakeEntry
    loader: Loader
    flops: float = 1e11
    readable: set[str] = field(default_factory=lambda: {MODEL})  # models it can read


class InProcessMesh:
    """A ControlClient that calls each node's EpochHost directly."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.calls: list[tuple[str, str]] = []

    def add(self, node_id: str, budget: int = 64 * MIB, started_at: float = 1.0,
            **kwargs) -> Node:
        entry, loader = FakeEntry(), Loader()
        host = EpochHost(node_id, entry, load_runtime=loader, check_layers=self._check(node_id),
                         load_served=self._served(node_id))
        info = peer_info(node_id, memory_budget_bytes=budget, started_at=started_at,
                         address=f"10.0.0.{len(self.nodes) + 1}")
        node = Node(info, host, entry, loader, **kwargs)
        self.nodes[node_id] = node
        return node

    def _served(self, node_id: str):
        def load(model: str) -> ServedModel:
            if model not in self.nodes[node_id].readable:
                raise FileNotFoundError(f"{model} is not on {node_id}")
            return ServedModel(model, None, 4096, 1024)
        return load

    def _check(self, node_id: str):
        def check(model: str, layers: tuple[int, ...]) -> None:
            if model not in self.nodes[node_id].readable:
                raise FileNotFoundError(f"{model} is not on {node_id}")
        return check

    def measure(self, peer: PeerInfo, model: str, timeout_s: float) -> pb.DeviceInfo:
        self.calls.append(("measure", peer.node_id))
        node = self.nodes[peer.node_id]
        info = pb.DeviceInfo(flops=node.flops, disk_read_bytes_per_s=1e9,
                             memory_budget_bytes=node.info.memory_budget_bytes)
        if model in node.readable:
            info.model_profile_json = PROFILE
        else:
            info.model_error = f"{model} is not a directory here"
        return info

    def prepare(self, peer: PeerInfo, plan: pb.PlanRequest, timeout_s: float) -> None:
        self.calls.append(("prepare", peer.node_id))
        try:
            self.nodes[peer.node_id].host.prepare(plan)
        except PrepareError as exc:
            raise NodeFailed(NodeFailure(peer.node_id, exc.kind, exc.message)) from None

    def drain(self, peer: PeerInfo, epoch: int, timeout_s: float) -> None:
        self.calls.append(("drain", peer.node_id))
        self.nodes[peer.node_id].host.drain(timeout_s)

    def commit(self, peer: PeerInfo, epoch: int, timeout_s: float) -> None:
        self.calls.append(("commit", peer.node_id))
        try:
            self.nodes[peer.node_id].host.commit(epoch)
        except PrepareError as exc:
            raise NodeFailed(NodeFailure(peer.node_id, exc.kind, exc.message)) from None

    def abort(self, peer: PeerInfo, epoch: int, timeout_s: float) -> None:
        self.calls.append(("abort", peer.node_id))
        self.nodes[peer.node_id].host.abort(epoch)


@dataclass
class Members:
    me: PeerInfo
    peers: list[PeerInfo] = field(default_factory=list)

    unchecked: list[PeerInfo] = field(default_factory=list)  # seen, not yet health-checked

    def states(self) -> list[PeerState]:
        return [*self.healthy_states(),
                *(PeerState(info, 0.0, 0.0, 0, 0, 0) for info in self.unchecked)]

    def healthy_states(self) -> list[PeerState]:
        return [PeerState(info, 0.0, 0.0, 0, 0, 0, verified=True) for info in self.peers]


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        yield pool


def coordinator_of(mesh: InProcessMesh, me: str, pool: ThreadPoolExecutor,
                   clock: Clock) -> tuple[Coordinator, Members]:
    node = mesh.nodes[me]
    members = Members(node.info, [n.info for i, n in mesh.nodes.items() if i != me])
    coordinator = Coordinator(node.host, members, Rollout(mesh, pool), proposed_model=MODEL,
                              started_at=node.info.started_at, clock=clock,
                              options=CoordinatorOptions(quiet_s=2.0, discovery_s=0.0))
    return coordinator, members


def run_until_idle(coordinator: Coordinator, clock: Clock, rounds: int = 10) -> float | None:
    """Step until the coordinator has nothing to do now; returns when it wants to wake."""
    for _ in range(rounds):
        until = coordinator.step()
        if until is None or until > clock.now:
            return until
    raise AssertionError("the coordinator never settled")


def settle(coordinator: Coordinator, clock: Clock) -> None:
    until = run_until_idle(coordinator, clock)
    if until is not None and until - clock.now <= 2.0:  # the quiet period
        clock.now = until
        run_until_idle(coordinator, clock)


def test_a_fresh_mesh_forms_without_the_node_that_cannot_read_the_model(pool) -> None:
    mesh, clock = InProcessMesh(), Clock()
    # The broken node is the senior one, so it coordinates: it plans with the profile its
    # peer read, and leaves itself out.
    broken = mesh.add("a", started_at=0.5, readable=set())
    good = mesh.add("b")
    coordinator, _ = coordinator_of(mesh, "a", pool, clock)
    settle(coordinator, clock)
    plan = coordinator.running()
    assert plan is not None and [m.node_id for m in plan.members] == ["b"]
    assert good.host.plan.epoch == plan.epoch and broken.host.plan is None
    exclusion = coordinator.exclusions()["a"]
    assert exclusion.failure.kind is FailureKind.LOAD_ERROR
    assert "not a directory" in exclusion.failure.message
    assert coordinator.unavailable([broken.info, good.info]) is None
    assert coordinator.leads_epoch == plan.epoch, "it still coordinates"


def test_a_joining_node_hears_the_mesh_before_it_plans_a_ring_of_its_own(pool) -> None:
    mesh, clock = InProcessMesh(), Clock()
    senior = mesh.add("a", started_at=0.5)
    mesh.add("b")
    members = Members(mesh.nodes["b"].info)
    coordinator = Coordinator(mesh.nodes["b"].host, members, Rollout(mesh, pool),
                              proposed_model=MODEL, started_at=1.0, clock=clock)
    # Alone past the quiet period, but still listening: no ring of one.
    assert coordinator.step() == 1000.0 + RE_PLAN_QUIET_S
    clock.now += RE_PLAN_QUIET_S
    assert coordinator.step() == 1000.0 + control.DISCOVERY_S
    # The senior node is seen over mDNS, not yet checked: still listening.
    members.unchecked.append(senior.info)
    clock.now = 1000.0 + control.DISCOVERY_S
    assert coordinator.step() == 1000.0 + control.DISCOVERY_MAX_S
    assert coordinator.running() is None and not mesh.calls
    # It answers its health check: the senior node coordinates, the newcomer follows.
    members.unchecked.clear()
    members.peers.append(senior.info)
    assert coordinator.step() is None
    assert coordinator.coordinator_id == "a" and not coordinator.is_me


def test_a_newcomer_that_fails_is_excluded_and_the_ring_is_never_drained(pool) -> None:
    mesh, clock = InProcessMesh(), Clock()
    a = mesh.add("a")
    coordinator, members = coordinator_of(mesh, "a", pool, clock)
    settle(coordinator, clock)
    running = coordinator.running()
    runtime = a.host.runtime
    # A faster newcomer: the planner wants it, but it runs out of memory loading.
    b = mesh.add("b", flops=1e13)
    b.loader.fail = MemoryError("cannot allocate 3 MiB")
    members.peers.append(b.info)
    mesh.calls.clear()
    a.entry.calls.clear()
    settle(coordinator, clock)
    assert ("prepare", "b") in mesh.calls and ("abort", "a") in mesh.calls
    assert ("drain", "a") not in mesh.calls and ("pause",) not in a.entry.calls
    assert coordinator.running() is running and a.host.runtime is runtime
    assert not runtime.stopped
    exclusion = coordinator.exclusions()["b"]
    assert exclusion.failure.kind is FailureKind.OUT_OF_MEMORY and exclusion.failures == 1
    # Retried after its back-off, and it keeps failing: the back-off doubles.
    clock.now = exclusion.retry_at
    settle(coordinator, clock)
    assert coordinator.exclusions()["b"].failures == 2
    assert coordinator.exclusions()["b"].retry_at == clock.now + 4
    # It is fixed and restarts: tried at once, and planned in.
    b.loader.fail = None
    restarted = peer_info("b", memory_budget_bytes=64 * MIB, started_at=50.0,
                          address=b.info.address)
    b.info = restarted
    members.peers[-1] = restarted
    clock.now += 1
    settle(coordinator, clock)
    assert "b" not in coordinator.exclusions()
    assert any(m.node_id == "b" and m.layers for m in coordinator.running().members)


def test_a_newcomer_left_out_commits_without_a_drain(pool) -> None:
    mesh, clock = InProcessMesh(), Clock()
    a = mesh.add("a")
    coordinator, members = coordinator_of(mesh, "a", pool, clock)
    settle(coordinator, clock)
    first = coordinator.running()
    runtime = a.host.runtime
    b = mesh.add("b", flops=1e9)  # slow: the planner leaves it out
    members.peers.append(b.info)
    mesh.calls.clear()
    settle(coordinator, clock)
    second = coordinator.running()
    assert second.epoch == first.epoch + 1 and second.ring_epoch == first.epoch
    assert [m.node_id for m in second.members if m.layers] == ["a"]
    assert not [c for c in mesh.calls if c[0] == "drain"]
    assert a.host.runtime is runtime and runtime.retargets == [] and not runtime.stopped
    assert b.host.plan.epoch == second.epoch and b.entry.calls == [("resume", "10.0.0.1:58080",
                                                                    first.epoch)]


def test_loading_a_model_no_node_can_read_fails_and_keeps_the_old_one(pool) -> None:
    mesh, clock = InProcessMesh(), Clock()
    mesh.add("a")
    coordinator, _ = coordinator_of(mesh, "a", pool, clock)
    settle(coordinator, clock)
    epoch = coordinator.running().epoch

    import threading

    outcome: dict[str, BaseException] = {}

    def load() -> None:
        try:
            coordinator.load_model("/no/such/model", timeout_s=60)
        except LoadFailed as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=load)
    thread.start()
    for _ in range(50):
        if not thread.is_alive():
            break
        coordinator.step()
        thread.join(0.05)
    assert not thread.is_alive()
    message = str(outcome["error"])
    assert "no node can run /no/such/model" in message and "not a directory" in message
    settle(coordinator, clock)
    assert coordinator.running().epoch == epoch and coordinator.running().model == MODEL
    assert coordinator.exclusions() == {}


def test_a_model_that_fits_nowhere_says_by_how_many_bytes(pool) -> None:
    mesh, clock = InProcessMesh(), Clock()
    a = mesh.add("a", budget=MIB)
    b = mesh.add("b", budget=MIB)
    coordinator, _ = coordinator_of(mesh, "a", pool, clock)
    settle(coordinator, clock)
    assert coordinator.running() is None
    verdict = coordinator.unavailable([a.info, b.info])
    assert verdict.kind is UnavailableKind.CANNOT_PLAN
    assert "bytes" in verdict.message and MODEL in verdict.message
    assert not [c for c in mesh.calls if c[0] == "prepare"]


# ----- the gRPC client: how failures are named ---------------------------------------------


class SlowControl(pb_grpc.ControlServicer):
    def Prepare(self, request, context):
        time.sleep(2)
        return pb.PrepareReply(ok=True)

    def Commit(self, request, context):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory loading layers 0-3")


def test_the_grpc_client_names_timeouts_unreachable_nodes_and_memory() -> None:
    server, port = start_server([(pb_grpc.add_ControlServicer_to_server, SlowControl())],
                                "127.0.0.1", 0)
    client = GrpcControlClient()
    try:
        peer = peer_info("a", address="127.0.0.1", grpc_port=port)
        with pytest.raises(NodeFailed) as slow:
            client.prepare(peer, pb.PlanRequest(epoch=1), timeout_s=0.3)
        assert slow.value.failure.kind is FailureKind.TIMEOUT
        with pytest.raises(NodeFailed) as memory:
            client.commit(peer, 1, timeout_s=5)
        assert memory.value.failure.kind is FailureKind.OUT_OF_MEMORY
        assert "layers 0-3" in memory.value.failure.message
    finally:
        server.stop(grace=None)
    gone = peer_info("b", address="127.0.0.1", grpc_port=free_port())
    with pytest.raises(NodeFailed) as unreachable:
        client.measure(gone, MODEL, timeout_s=5)
    assert unreachable.value.failure.kind is FailureKind.UNREACHABLE
