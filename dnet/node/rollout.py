"""Drain, prepare, commit: moving every member from one plan to the next, in one place.

The order keeps the running ring serving for as long as possible:

1. measure every member (and have it read the model's profile: a node that cannot is out);
2. plan (the pure planner) and decide whether the ring changes (control.needs_drain);
3. prepare on every member, while the running ring serves; a failure aborts everywhere and
   names the nodes that failed, so the coordinator can exclude them and plan again;
4. drain every entry, only when the ring changes;
5. commit everywhere.

Every call to a member goes through a `ControlClient`, which raises `NodeFailed`; gathering
the calls made in parallel turns those into `NodeFailure` values, raised together as
`NodesFailed`. Tests drive this module with a fake client (tests/test_mesh_rollout.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc

from discovery.peers import PeerInfo
from dnet.model_files import format_layers
from dnet.node.control import FailureKind, NodeFailure, failure_of_status, needs_drain
from dnet.node.host import layout_of, ring_epoch
from dnet.progress import progress
from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring import auth
from planner import (
    DeviceProfile,
    InfeasiblePlanError,
    ModelProfile,
    PlanOptions,
    plan_layers,
    to_json,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_LATENCY_MS = 1.0


@dataclass(frozen=True)
class Deadlines:
    measure_s: float = 30.0  # reading a hub model's headers takes a few seconds
    prepare_s: float = 900.0  # loading a large model's layers from disk takes minutes
    drain_s: float = 10.0  # requests in flight get this long to end before they fail
    commit_s: float = 900.0  # a commit may load layers deferred from prepare
    abort_s: float = 10.0


class NodeFailed(Exception):
    """One member could not do what it was asked."""

    def __init__(self, failure: NodeFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class NodesFailed(Exception):
    """Some members could not take part in a plan; nothing was committed."""

    def __init__(self, failures: Sequence[NodeFailure]) -> None:
        super().__init__("; ".join(f"{f.node_id}: {f.kind.value}: {f.message}"
                                   for f in failures))
        self.failures = tuple(failures)


class CannotPlan(Exception):
    """No plan exists for the model on these members (e.g. it fits nowhere)."""


class ControlClient(Protocol):
    """The Control service of each member, as the rollout calls it. Each raises NodeFailed."""

    def measure(self, peer: PeerInfo, model: str, timeout_s: float) -> pb.DeviceInfo: ...

    def prepare(self, peer: PeerInfo, plan: pb.PlanRequest, timeout_s: float) -> None: ...

    def drain(self, peer: PeerInfo, epoch: int, timeout_s: float) -> None: ...

    def commit(self, peer: PeerInfo, epoch: int, timeout_s: float) -> None: ...

    def abort(self, peer: PeerInfo, epoch: int, timeout_s: float) -> None: ...


class Rollout:
    def __init__(self, client: ControlClient, pool: ThreadPoolExecutor,
                 deadlines: Deadlines | None = None) -> None:
        self.client = client
        self.deadlines = deadlines or Deadlines()
        self._pool = pool

    def measure(self, peers: Sequence[PeerInfo], model: str) -> list[pb.DeviceInfo]:
        """Every member's device, in `peers` order; raises NodesFailed naming the members
        that did not answer or cannot read `model`."""
        results = self._each(peers, lambda p: self.client.measure(p, model,
                                                                  self.deadlines.measure_s),
                             f"measuring {len(peers)} device(s)")
        failures = [r for r in results if isinstance(r, NodeFailure)]
        failures += [NodeFailure(p.node_id, FailureKind.LOAD_ERROR,
                                 f"cannot read {model}: {r.model_error}")
                     for p, r in zip(peers, results, strict=True)
                     if isinstance(r, pb.DeviceInfo) and r.model_error]
        if failures:
            raise NodesFailed(failures)
        return [r for r in results if isinstance(r, pb.DeviceInfo)]

    def run(self, plan: pb.PlanRequest, peers: Sequence[PeerInfo],
            running: pb.PlanRequest | None) -> None:
        """Prepare, drain if the ring changes, commit. Raises NodesFailed."""
        deadlines = self.deadlines
        prepared = self._each(peers, lambda p: self.client.prepare(p, plan, deadlines.prepare_s))
        failures = [r for r in prepared if isinstance(r, NodeFailure)]
        if failures:
            self._abort(plan.epoch, [p for p, r in zip(peers, prepared, strict=True)
                                     if not isinstance(r, NodeFailure)])
            raise NodesFailed(failures)
        if needs_drain(layout_of(running) if running else None, layout_of(plan)):
            log.info("epoch %d: draining the entries", plan.epoch)
            drained = self._each(peers, lambda p: self.client.drain(
                p, plan.epoch, deadlines.drain_s))
            failures = [r for r in drained if isinstance(r, NodeFailure)]
            if failures:
                self._abort(plan.epoch, peers)
                raise NodesFailed(failures)
        else:
            log.info("epoch %d: the ring is unchanged; committing without a drain", plan.epoch)
        committed = self._each(peers, lambda p: self.client.commit(p, plan.epoch,
                                                                   deadlines.commit_s))
        failures = [r for r in committed if isinstance(r, NodeFailure)]
        if failures:
            raise NodesFailed(failures)

    def _abort(self, epoch: int, peers: Sequence[PeerInfo]) -> None:
        for failure in self._each(peers, lambda p: self.client.abort(p, epoch,
                                                                     self.deadlines.abort_s)):
            if isinstance(failure, NodeFailure):
                log.warning("could not abort epoch %d on %s: %s", epoch, failure.node_id,
                            failure.message)

    def _each(self, peers: Sequence[PeerInfo], call: Callable[[PeerInfo], T],
              description: str = "") -> list[T | NodeFailure]:
        def one(peer: PeerInfo) -> T | NodeFailure:
            try:
                return call(peer)
            except NodeFailed as exc:
                return exc.failure

        results = self._pool.map(one, peers)
        if description:
            return list(progress(results, description, total=len(peers)))
        return list(results)


# ----- making a plan --------------------------------------------------------------------------


def make_plan(peers: Sequence[PeerInfo], devices: Sequence[pb.DeviceInfo], *, model: str,
              epoch: int, coordinator: str, context_tokens: int,
              running: pb.PlanRequest | None) -> pb.PlanRequest:
    """The plan for `model` on `peers` (whose measured `devices` are in the same order).

    Its ring_epoch is the running plan's when every layer stays where it is. Raises
    CannotPlan when no member could read the model or no plan fits (naming the shortfall)."""
    profiles = [d.model_profile_json for d in devices if d.model_profile_json]
    if not profiles:
        raise CannotPlan(f"no node could read {model}")
    profile = ModelProfile.from_dict(json.loads(profiles[0]))
    try:
        plan = plan_layers(profile, [device_profile(p, d) for p, d in zip(
            peers, devices, strict=True)], PlanOptions(context_tokens=context_tokens,
                                                       reserve_bytes=0))
    except (InfeasiblePlanError, ValueError) as exc:
        raise CannotPlan(f"cannot run {model} on this mesh: {exc}") from exc
    by_id = {peer.node_id: peer for peer in peers}
    placed = {member.id: member for member in plan.devices}
    order = list(plan.ring) + sorted(set(by_id) - set(plan.ring))
    members = [pb.PlanMember(
        node_id=node_id, name=by_id[node_id].name, grpc_address=by_id[node_id].grpc_address,
        http_port=by_id[node_id].http_port,
        layers=list(placed[node_id].layers) if node_id in placed else [],
        window=placed[node_id].window if node_id in placed else 0,
    ) for node_id in order]
    for line in plan.explanation:
        log.info("plan: %s", line)
    request = pb.PlanRequest(epoch=epoch, model=model, coordinator=coordinator,
                             members=members, plan_json=to_json(plan), ring_epoch=epoch)
    if running is not None and not needs_drain(layout_of(running), layout_of(request)):
        request.ring_epoch = ring_epoch(running)
    return request


def device_profile(peer: PeerInfo, device: pb.DeviceInfo) -> DeviceProfile:
    """What the planner knows of a device. The memory it may fill with weights and KV cache is
    the node's budget less what the node sets aside for its prefix cache."""
    peer_latency = dict(device.peer_latency_ms)
    default = (sum(peer_latency.values()) / len(peer_latency) if peer_latency
               else DEFAULT_LATENCY_MS)
    budget = max(0, int(device.memory_budget_bytes) - int(device.prefix_cache_bytes))
    return DeviceProfile(id=peer.node_id, memory_budget_bytes=budget,
                         flops=device.flops, disk_read_bytes_per_s=device.disk_read_bytes_per_s,
                         latency_ms=default, peer_latency_ms=peer_latency)


def describe(plan: pb.PlanRequest) -> str:
    return ", ".join(f"{m.name}: {format_layers(m.layers) or 'entry only'}"
                     for m in plan.members)


# ----- the real client ------------------------------------------------------------------------


class GrpcControlClient:
    """ControlClient over gRPC, signing calls with the cluster key."""

    def measure(self, peer: PeerInfo, model: str, timeout_s: float) -> pb.DeviceInfo:
        return self._call(peer, lambda stub: stub.Measure(pb.MeasureRequest(model=model),
                                                          timeout=timeout_s))

    def prepare(self, peer: PeerInfo, plan: pb.PlanRequest, timeout_s: float) -> None:
        reply = self._call(peer, lambda stub: stub.Prepare(plan, timeout=timeout_s))
        if not reply.ok:
            kind = FailureKind[pb.FailureKind.Name(reply.failure)] if reply.failure else (
                FailureKind.LOAD_ERROR)
            raise NodeFailed(NodeFailure(peer.node_id, kind, reply.error))

    def drain(self, peer: PeerInfo, epoch: int, timeout_s: float) -> None:
        self._call(peer, lambda stub: stub.Drain(pb.DrainRequest(epoch=epoch,
                                                                 timeout_s=timeout_s),
                                                 timeout=timeout_s + 10))

    def commit(self, peer: PeerInfo, epoch: int, timeout_s: float) -> None:
        self._call(peer, lambda stub: stub.Commit(pb.CommitRequest(epoch=epoch),
                                                  timeout=timeout_s))

    def abort(self, peer: PeerInfo, epoch: int, timeout_s: float) -> None:
        self._call(peer, lambda stub: stub.Abort(pb.CommitRequest(epoch=epoch),
                                                 timeout=timeout_s))

    @staticmethod
    def _call(peer: PeerInfo, call: Callable[[pb_grpc.ControlStub], T]) -> T:
        with auth.channel(peer.grpc_address) as channel:
            try:
                return call(pb_grpc.ControlStub(channel))
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                raise NodeFailed(NodeFailure(
                    peer.node_id, failure_of_status(code.name),
                    f"{code.name}: {exc.details()}")) from None  # type: ignore[attr-defined]
