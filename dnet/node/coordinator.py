"""The coordinator's job: notice membership changes, plan, and roll the plan out.

Every node runs this loop; only the elected one acts. It waits until the member set has been
quiet for a moment (a burst of joins gives one re-plan), measures each device, runs the
planner, then drives drain -> prepare -> commit on every member (dnet/node/host.py), with
an epoch one above any seen so far.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import grpc

from discovery.election import Candidate, Debounce, elect, step
from discovery.peers import PeerInfo
from dnet.model_files import format_layers
from dnet.node.host import EpochHost
from dnet.node.membership import Membership
from dnet.plan_cli import ModelResolutionError, resolve_model_profile
from dnet.progress import progress
from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring import auth
from planner import DeviceProfile, InfeasiblePlanError, PlanOptions, plan_layers, to_json

log = logging.getLogger(__name__)

TICK_S = 0.5
MEASURE_TIMEOUT_S = 30.0
PREPARE_TIMEOUT_S = 900.0  # loading a large model's layers from disk takes minutes
DEFAULT_LATENCY_MS = 1.0


@dataclass(frozen=True)
class CoordinatorOptions:
    context_tokens: int = 4096
    drain_timeout_s: float = 10.0
    quiet_s: float = 2.0


class Coordinator:
    def __init__(self, host: EpochHost, membership: Membership, *, proposed_model: str,
                 started_at: float, options: CoordinatorOptions | None = None,
                 stopped: Callable[[], bool] = lambda: False) -> None:
        self.host = host
        self.membership = membership
        self.proposed_model = proposed_model
        self.started_at = started_at
        self.options = options or CoordinatorOptions()
        self.coordinator_id: str | None = None
        self.leads_epoch = 0
        self.last_error = ""
        self._explicit_model = ""
        self._debounce = Debounce()
        self._failures = 0
        self._retry_at = 0.0
        self._stopped = stopped
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="control")
        self._replan_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="coordinator", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def is_me(self) -> bool:
        return self.coordinator_id == self.host.node_id

    # ----- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped():
            try:
                self.tick()
            except Exception:  # the loop must outlive any one bad round
                log.exception("coordinator round failed")
            time.sleep(TICK_S)

    def tick(self) -> None:
        states = self.membership.healthy_states()
        me = Candidate(self.host.node_id, self.started_at, self._my_leads_epoch())
        coordinator = elect([me, *states])
        if coordinator != self.coordinator_id:
            name = "this node" if coordinator == self.host.node_id else coordinator
            log.info("coordinator: %s", name)
            self.coordinator_id = coordinator
            self._debounce = Debounce()
        if not self.is_me:
            return
        infos = [self.membership.me, *(s.info for s in states)]
        model = self.desired_model(infos)
        if not model:
            return
        members = frozenset(info.node_id for info in infos) | {f"model={model}"}
        changed = members != self._debounce.pending
        self._debounce, fire = step(self._debounce, members, time.monotonic(),
                                    self.options.quiet_s)
        if changed:
            self._retry_at = 0.0  # new members: no need to wait out a back-off
        if time.monotonic() < self._retry_at:
            self._debounce = Debounce(pending=self._debounce.pending,
                                      changed_at=self._debounce.changed_at)
            return
        if fire and not self._plan_is_current(infos, model):
            self.replan(infos, model, [s.epoch for s in states])

    def _my_leads_epoch(self) -> int:
        plan = self.host.plan
        return plan.epoch if plan is not None and plan.coordinator == self.host.node_id else 0

    def _plan_is_current(self, infos: list[PeerInfo], model: str) -> bool:
        plan = self.host.plan
        return (plan is not None and plan.model == model and not self.last_error
                and {m.node_id for m in plan.members} == {i.node_id for i in infos})

    def desired_model(self, infos: list[PeerInfo]) -> str:
        """The cluster's model: the last one loaded explicitly; else the current plan's; else
        this node's --model; else that of the most senior node that proposes one."""
        if self._explicit_model:
            return self._explicit_model
        if self.host.plan is not None:
            return self.host.plan.model
        if self.proposed_model:
            return self.proposed_model
        proposals = sorted((i.started_at, i.node_id, i.model) for i in infos if i.model)
        return proposals[0][2] if proposals else ""

    def load_model(self, model: str, timeout_s: float = PREPARE_TIMEOUT_S) -> str:
        """Switch the cluster's model; returns "" when committed, else the error."""
        self._explicit_model = model
        self.last_error = ""
        self._retry_at = 0.0
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            plan = self.host.plan
            if plan is not None and plan.model == model:
                return ""
            if self.last_error:
                return self.last_error
            time.sleep(0.2)
        return f"loading {model} did not finish within {timeout_s:.0f} s"

    # ----- one re-plan -------------------------------------------------------------------

    def replan(self, infos: list[PeerInfo], model: str, seen_epochs: list[int]) -> None:
        with self._replan_lock:
            epoch = max([self.host.epoch, self.leads_epoch, *seen_epochs]) + 1
            try:
                request = self._plan(infos, model, epoch)
            except (ModelResolutionError, InfeasiblePlanError, ValueError) as exc:
                self._failed(f"cannot plan {model}: {exc}")
                return
            self._roll_out(request, infos)

    def _plan(self, infos: list[PeerInfo], model: str, epoch: int) -> pb.PlanRequest:
        profile = resolve_model_profile(model)
        devices = self._measure(infos)
        plan = plan_layers(profile, devices, PlanOptions(
            context_tokens=self.options.context_tokens, reserve_bytes=0))
        by_id = {info.node_id: info for info in infos}
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
        return pb.PlanRequest(epoch=epoch, model=model, coordinator=self.host.node_id,
                              members=members, plan_json=to_json(plan))

    def _measure(self, infos: list[PeerInfo]) -> list[DeviceProfile]:
        futures = [self._pool.submit(self._call_one, info, lambda stub: stub.Measure(
            pb.MeasureRequest(), timeout=MEASURE_TIMEOUT_S)) for info in infos]
        for _ in progress(as_completed(futures), f"measuring {len(infos)} device(s)",
                          total=len(futures)):
            pass
        replies = [future.result() for future in futures]
        devices = []
        for info, reply in zip(infos, replies, strict=True):
            if isinstance(reply, Exception):
                raise ValueError(f"could not measure {info.name}: {reply}")
            peer_latency = dict(reply.peer_latency_ms)
            default = (sum(peer_latency.values()) / len(peer_latency) if peer_latency
                       else DEFAULT_LATENCY_MS)
            devices.append(DeviceProfile(
                id=info.node_id, memory_budget_bytes=int(reply.memory_budget_bytes),
                flops=reply.flops, disk_read_bytes_per_s=reply.disk_read_bytes_per_s,
                latency_ms=default, peer_latency_ms=peer_latency))
        return devices

    def _roll_out(self, request: pb.PlanRequest, infos: list[PeerInfo]) -> None:
        summary = ", ".join(f"{m.name}: {format_layers(m.layers) or 'entry only'}"
                            for m in request.members)
        log.info("epoch %d: rolling out %s over %d node(s): %s", request.epoch, request.model,
                 len(infos), summary)
        drain = pb.DrainRequest(epoch=request.epoch, timeout_s=self.options.drain_timeout_s)
        self._call_all(infos, lambda stub: stub.Drain(
            drain, timeout=self.options.drain_timeout_s + 10))
        replies = self._call_all(infos, lambda stub: stub.Prepare(
            request, timeout=PREPARE_TIMEOUT_S))
        errors = [f"{info.name}: {reply if isinstance(reply, Exception) else reply.error}"
                  for info, reply in zip(infos, replies, strict=True)
                  if isinstance(reply, Exception) or not reply.ok]
        if errors:
            self._failed(f"epoch {request.epoch} not committed; " + "; ".join(errors))
            return
        commits = self._call_all(infos, lambda stub: stub.Commit(
            pb.CommitRequest(epoch=request.epoch), timeout=10))
        failed = [info.name for info, reply in zip(infos, commits, strict=True)
                  if isinstance(reply, Exception)]
        if failed:
            self._failed(f"epoch {request.epoch}: commit failed on {', '.join(failed)}")
            return
        self.leads_epoch = request.epoch
        self.last_error = ""
        self._failures = 0
        log.info("epoch %d is live", request.epoch)

    def _failed(self, message: str) -> None:
        if message != self.last_error:
            log.error("%s", message)
        self.last_error = message
        # Try again after a back-off, or at once when the members change (a new debounce).
        self._retry_at = time.monotonic() + min(30.0, 2.0 * 2 ** self._failures)
        self._failures += 1
        self._debounce = Debounce()

    def _call_all(self, infos: list[PeerInfo], call: Callable) -> list:
        return list(self._pool.map(lambda info: self._call_one(info, call), infos))

    @staticmethod
    def _call_one(info: PeerInfo, call: Callable):
        with auth.channel(info.grpc_address) as channel:
            try:
                return call(pb_grpc.ControlStub(channel))
            except grpc.RpcError as exc:
                return exc
