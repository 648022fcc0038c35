"""The coordinator's loop: elect, decide, roll out, and wait for the next event.

Every node runs it; only the elected one acts. Each round reads the member table, runs the
election (discovery/election.py) and the coordinator's decision (dnet/node/control.py, pure,
with the time passed in), then carries the decision out (dnet/node/rollout.py). Between
rounds it sleeps until the decision's deadline (the end of a quiet period, a back-off) or
until woken: by a membership change, `dnet load`, or shutdown. Nothing polls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from discovery.election import RE_PLAN_QUIET_S, Candidate, elect
from discovery.peers import PeerInfo, PeerState
from dnet.node import control
from dnet.node.control import (
    ControlState,
    Exclusion,
    Fingerprint,
    Member,
    Proposal,
    RunningPlan,
    Target,
    Unavailable,
    UnavailableKind,
    View,
)
from dnet.node.host import EpochHost
from dnet.node.rollout import CannotPlan, Deadlines, NodesFailed, Rollout, describe, make_plan
from dnet.proto import dnet_ring_pb2 as pb
from planner.devices import DEFAULT_CONTEXT_TOKENS

log = logging.getLogger(__name__)

ROUND_FAILED_RETRY_S = 1.0  # after an unexpected error in a round (a bug): try again soon


class LoadFailed(Exception):
    """`dnet load` could not switch the cluster to the model."""


class Members(Protocol):
    """What the coordinator reads of dnet/node/membership.py."""

    @property
    def me(self) -> PeerInfo: ...

    def states(self) -> list[PeerState]: ...

    def healthy_states(self) -> list[PeerState]: ...


@dataclass(frozen=True)
class CoordinatorOptions:
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    quiet_s: float = RE_PLAN_QUIET_S
    discovery_s: float = control.DISCOVERY_S  # see control.listening_until
    discovery_max_s: float = control.DISCOVERY_MAX_S
    deadlines: Deadlines = field(default_factory=Deadlines)


def member_of(info: PeerInfo) -> Member:
    return Member(info.node_id, info.name, Fingerprint(info.started_at, info.instance,
                                                       info.model))


def running_of(plan: pb.PlanRequest | None) -> RunningPlan | None:
    if plan is None:
        return None
    return RunningPlan(plan.epoch, plan.model, frozenset(m.node_id for m in plan.members),
                       frozenset(m.node_id for m in plan.members if m.layers))


class Coordinator:
    def __init__(self, host: EpochHost, members: Members, rollout: Rollout, *,
                 proposed_model: str, started_at: float,
                 options: CoordinatorOptions | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.members = members
        self.rollout = rollout
        self.proposed_model = proposed_model
        self.started_at = started_at
        self.options = options or CoordinatorOptions()
        self.coordinator_id: str | None = None
        self.leads_epoch = 0
        self._clock = clock
        self._listening_from = clock()
        self._state = ControlState()
        self._running: pb.PlanRequest | None = None  # the last plan this node committed
        self._loaded = ""  # the model of the last `dnet load`
        self._load_verdict: Unavailable | None = None  # why that model cannot run, if known
        self._lock = threading.Condition()  # guards the fields above; notified per outcome
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coordinator", daemon=True)

    # ----- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self._listening_from = self._clock()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._lock:
            self._lock.notify_all()

    def wake(self) -> None:
        """Something changed (members, health, a load): decide again now."""
        self._wake.set()

    @property
    def is_me(self) -> bool:
        return self.coordinator_id == self.host.node_id

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                until = self.step()
            except Exception:  # the loop must outlive any one bad round
                log.exception("coordinator round failed")
                until = self._clock() + ROUND_FAILED_RETRY_S
            timeout = None if until is None else max(0.0, until - self._clock())
            self._wake.wait(timeout)

    # ----- one round --------------------------------------------------------------------

    def step(self) -> float | None:
        """Elect, decide and act once; returns when to decide again (None: on a change)."""
        states = self.members.healthy_states()
        me = Candidate(self.host.node_id, self.started_at, self._my_leads_epoch())
        coordinator = elect([me, *states])
        if coordinator != self.coordinator_id:
            log.info("coordinator: %s", "this node" if coordinator == self.host.node_id
                     else coordinator)
            self.coordinator_id = coordinator
        if not self.is_me:
            return None
        infos = [self.members.me, *(s.info for s in states)]
        view = self._view(infos)
        now = self._clock()
        with self._lock:
            state, action = control.decide(self._state, view, now, self.options.quiet_s)
            self._state = state
        if isinstance(action, control.Wait):
            return action.until
        unchecked = sum(1 for state in self.members.states() if not state.verified)
        listening = control.listening_until(self._listening_from, now, unchecked,
                                            self.options.discovery_s,
                                            self.options.discovery_max_s)
        if listening is not None:  # a node that just started plans only once it has heard
            return listening
        self._replan(action.target, infos, [s.epoch for s in states])
        return self._clock()

    def _view(self, infos: list[PeerInfo]) -> View:
        running = self.running()
        with self._lock:
            loaded = self._loaded
        model = control.desired_model(
            loaded, running.model if running else "", self.proposed_model,
            [Proposal(i.node_id, i.started_at, i.model) for i in infos])
        return View(tuple(member_of(i) for i in infos), model, running_of(running))

    def _replan(self, target: Target, infos: list[PeerInfo], seen_epochs: list[int]) -> None:
        peers = [info for info in infos if info.node_id in target.members]
        members = [member_of(info) for info in infos]
        running = self.running()
        epoch = max([self.host.epoch, self.leads_epoch, *seen_epochs,
                     running.epoch if running else 0]) + 1
        try:
            devices = self.rollout.measure(peers, target.model)
            plan = make_plan(peers, devices, model=target.model, epoch=epoch,
                             coordinator=self.host.node_id,
                             context_tokens=self.options.context_tokens, running=running)
            log.info("epoch %d: rolling out %s over %d node(s): %s", epoch, target.model,
                     len(peers), describe(plan))
            self.rollout.run(plan, peers, running)
        except NodesFailed as exc:
            failures = exc.failures
            names = {info.node_id: info.name for info in infos}
            for failure in failures:
                log.warning("excluding %s (%s) from planning: %s: %s",
                            names.get(failure.node_id, "?"), failure.node_id,
                            failure.kind.value, failure.message)
            self._record(lambda s: control.record_failures(s, failures, members,
                                                           self._clock()), infos)
        except CannotPlan as exc:
            message = str(exc)
            with self._lock:
                repeated = self._state.cannot_plan == message
            if not repeated:
                log.error("%s", message)
            self._record(lambda s: control.record_plan_failure(s, target, message,
                                                               self._clock()), infos)
        else:
            with self._lock:
                self._running = plan
                self.leads_epoch = epoch
            log.info("epoch %d is live", epoch)
            self._record(lambda s: control.record_commit(s, target), infos)

    def _record(self, change: Callable[[ControlState], ControlState],
                infos: list[PeerInfo]) -> None:
        with self._lock:
            self._state = change(self._state)
            loaded, running = self._loaded, self._running
            if loaded and not (running is not None and running.model == loaded):
                view = View(tuple(member_of(i) for i in infos), loaded, None)
                verdict = control.unavailable(self._state, view, self._clock())
                if verdict is not None and verdict.kind in (UnavailableKind.CANNOT_PLAN,
                                                            UnavailableKind.NO_NODE):
                    self._load_verdict = verdict
            self._lock.notify_all()

    # ----- what the node asks -----------------------------------------------------------

    def running(self) -> pb.PlanRequest | None:
        """The plan the mesh runs, as far as this node knows (it need not be a member)."""
        with self._lock:
            mine = self._running
        plan = self.host.plan
        if mine is not None and (plan is None or mine.epoch >= plan.epoch):
            return mine
        return plan

    def unavailable(self, infos: list[PeerInfo]) -> Unavailable | None:
        """Why no ring can serve now (this node being the coordinator), or None."""
        view = self._view(infos)
        with self._lock:
            return control.unavailable(self._state, view, self._clock())

    def exclusions(self) -> dict[str, Exclusion]:
        with self._lock:
            return dict(self._state.exclusions)

    def retry_in_s(self, exclusion: Exclusion) -> float:
        return max(0.0, exclusion.retry_at - self._clock())

    def load_model(self, model: str, timeout_s: float) -> None:
        """Switch the cluster to `model` (this node being the coordinator) and wait until it
        is committed. Raises LoadFailed when no node can run it, no plan fits, or time runs
        out; the cluster then keeps its previous model."""
        deadline = self._clock() + timeout_s
        with self._lock:
            previous = self._loaded
            self._loaded = model
            self._load_verdict = None
            self._state = control.forget_failures(self._state)
        self.wake()
        with self._lock:
            while not self._stop.is_set():
                running = self._running
                if running is not None and running.model == model:
                    return
                if self._load_verdict is not None:
                    message = self._load_verdict.message
                    break
                left = deadline - self._clock()
                if left <= 0:
                    message = f"loading {model} did not finish within {timeout_s:.0f} s"
                    break
                self._lock.wait(left)
            else:
                message = "this node is shutting down"
            self._loaded = previous
            self._state = control.forget_failures(self._state)
        self.wake()
        raise LoadFailed(message)

    def _my_leads_epoch(self) -> int:
        if self.leads_epoch:
            return self.leads_epoch
        plan = self.host.plan
        return plan.epoch if plan is not None and plan.coordinator == self.host.node_id else 0
