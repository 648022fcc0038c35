"""The coordinator's decisions, as pure functions of plain data with the time passed in.

What the coordinator does next (`decide`), who it leaves out of planning and until when
(`record_failures`, back-off), why no ring can serve (`unavailable`), which model the cluster
runs (`desired_model`) and whether a new plan needs a drain (`needs_drain`) are all decided
here, from frozen values; dnet/node/coordinator.py gathers the values, carries the decisions
out over gRPC and waits on events. Nothing here reads a clock, opens a socket or starts a
thread, so every rule is tested exhaustively in tests/test_mesh_control_rules.py.

Exclusion: a node that fails a plan (it cannot read the model, runs out of memory loading its
layers, does not answer in time, or cannot be reached) is left out of planning for a back-off
that doubles with each failure in a row (2 s, 4 s, ... capped at 60 s), then tried again. It
is tried at once when it changes: it restarts (a new start time or mDNS registration), or it
proposes another model; `dnet load` clears every exclusion.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

from discovery.election import RE_PLAN_QUIET_S, Debounce, step

BACKOFF_BASE_S = 2.0
BACKOFF_CAP_S = 60.0
# A node that just started listens before it plans, so a node joining a mesh hears the nodes
# already there (and follows their coordinator) instead of planning a ring of itself first.
DISCOVERY_S = 3.0
# It waits for peers it has seen over mDNS but not yet health-checked up to this long after
# its start; an advert of a dead node (never answering) cannot hold planning up longer.
DISCOVERY_MAX_S = 15.0


class FailureKind(Enum):
    """Why a node could not take part in a plan (the proto's FailureKind, by name)."""

    LOAD_ERROR = "load error"
    OUT_OF_MEMORY = "out of memory"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"


class UnavailableKind(Enum):
    """Why no ring can serve a request."""

    NO_COORDINATOR = "no coordinator"
    NO_MODEL = "no model"
    NO_NODE = "no node can load the model"
    CANNOT_PLAN = "cannot plan"
    REPLANNING = "re-planning"
    SHUTTING_DOWN = "shutting down"
    JOINING = "joining"  # this node only: the ring serves, and its plan has not reached it yet


@dataclass(frozen=True)
class Unavailable:
    kind: UnavailableKind
    message: str


@dataclass(frozen=True)
class Fingerprint:
    """What about a node, when it changes, earns it a retry before its back-off ends."""

    started_at: float
    instance: str  # its mDNS registration
    model: str  # the model it proposes


@dataclass(frozen=True)
class Member:
    """A healthy node, as the coordinator plans with it (this node included)."""

    node_id: str
    name: str
    fingerprint: Fingerprint


@dataclass(frozen=True)
class NodeFailure:
    node_id: str
    kind: FailureKind
    message: str


@dataclass(frozen=True)
class Exclusion:
    failure: NodeFailure
    name: str
    failures: int  # in a row
    retry_at: float  # monotonic seconds
    fingerprint: Fingerprint

    def describe(self) -> str:
        return f"{self.name}: {self.failure.kind.value}: {self.failure.message}"


@dataclass(frozen=True)
class Target:
    """What a plan is for: a model on a set of nodes."""

    model: str
    members: frozenset[str]


@dataclass(frozen=True)
class RunningPlan:
    """The committed plan, as far as decisions need it."""

    epoch: int
    model: str
    members: frozenset[str]  # every node in the plan, entries only included
    ring: frozenset[str]  # the nodes holding layers


@dataclass(frozen=True)
class View:
    """What the coordinator sees now."""

    members: tuple[Member, ...]  # this node and its healthy peers
    model: str  # the model the cluster should run ("" when none is chosen)
    running: RunningPlan | None


@dataclass(frozen=True)
class ControlState:
    quiet: Debounce = Debounce()  # over the healthy member ids: a burst of joins is one plan
    exclusions: Mapping[str, Exclusion] = field(default_factory=dict)
    failed: Target | None = None  # the target of the last plan that could not be made
    failures: int = 0  # plan-level failures in a row
    retry_at: float = 0.0
    cannot_plan: str = ""  # why that plan could not be made


@dataclass(frozen=True)
class Wait:
    """Nothing to do until `until` (monotonic seconds), or until something changes (None)."""

    until: float | None


@dataclass(frozen=True)
class Replan:
    target: Target


Action = Wait | Replan


def listening_until(started: float, now: float, unchecked: int,
                    discovery_s: float = DISCOVERY_S,
                    discovery_max_s: float = DISCOVERY_MAX_S) -> float | None:
    """Until when (monotonic seconds) a node started at `started` listens before it plans, or
    None once it may plan. `unchecked` is the number of peers seen but not yet health-checked:
    while any remains, listening lasts up to `discovery_max_s` after the start (the caller is
    woken as soon as one answers)."""
    if now < started + discovery_s:
        return started + discovery_s
    if unchecked > 0 and now < started + discovery_max_s:
        return started + discovery_max_s
    return None


def backoff_s(failures: int) -> float:
    """Seconds to wait after `failures` (>= 1) failures in a row: 2, 4, 8, ... capped at 60."""
    doublings = min(max(1, failures) - 1, 32)  # past the cap long before; no float overflow
    return float(min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**doublings))


def decide(state: ControlState, view: View, now: float,
           quiet_s: float = RE_PLAN_QUIET_S) -> tuple[ControlState, Action]:
    """The coordinator's next action: plan for a target now, or wait until when."""
    state = _forget_changed(state, view)
    quiet, _ = step(state.quiet, frozenset(m.node_id for m in view.members), now, quiet_s)
    state = replace(state, quiet=quiet)
    if not view.model:
        return state, Wait(None)
    target = Target(view.model, eligible(state, view, now))
    retries = _next_retry(state, view, now)
    if not target.members:
        return state, Wait(retries)
    running = view.running
    if running is not None and (running.model, running.members) == (target.model,
                                                                    target.members):
        return state, Wait(retries)
    settled_at = quiet.changed_at + quiet_s
    if now < settled_at:
        return state, Wait(settled_at)
    if state.failed == target and now < state.retry_at:
        return state, Wait(_earliest(state.retry_at, retries))
    return state, Replan(target)


def eligible(state: ControlState, view: View, now: float) -> frozenset[str]:
    """The members a plan may use now: all but those excluded whose back-off runs."""
    return frozenset(m.node_id for m in view.members if not _excluded(state, m.node_id, now))


def _excluded(state: ControlState, node_id: str, now: float) -> bool:
    exclusion = state.exclusions.get(node_id)
    return exclusion is not None and now < exclusion.retry_at


def _forget_changed(state: ControlState, view: View) -> ControlState:
    """Drop the exclusions of members that changed since they failed: they get a retry."""
    by_id = {m.node_id: m for m in view.members}
    kept = {node_id: e for node_id, e in state.exclusions.items()
            if node_id not in by_id or by_id[node_id].fingerprint == e.fingerprint}
    return state if len(kept) == len(state.exclusions) else replace(state, exclusions=kept)


def _next_retry(state: ControlState, view: View, now: float) -> float | None:
    ids = {m.node_id for m in view.members}
    pending = [e.retry_at for node_id, e in state.exclusions.items()
               if node_id in ids and e.retry_at > now]
    return min(pending, default=None)


def _earliest(*times: float | None) -> float | None:
    return min((t for t in times if t is not None), default=None)


# ----- outcomes ------------------------------------------------------------------------------


def record_failures(state: ControlState, failures: Iterable[NodeFailure],
                    members: Sequence[Member], now: float) -> ControlState:
    """Exclude the nodes that failed a plan, each for its back-off."""
    by_id = {m.node_id: m for m in members}
    exclusions = dict(state.exclusions)
    for failure in failures:
        member = by_id.get(failure.node_id)
        if member is None:
            continue
        previous = exclusions.get(failure.node_id)
        count = previous.failures + 1 if previous is not None else 1
        exclusions[failure.node_id] = Exclusion(
            failure=failure, name=member.name, failures=count,
            retry_at=now + backoff_s(count), fingerprint=member.fingerprint)
    return replace(state, exclusions=exclusions)


def record_plan_failure(state: ControlState, target: Target, message: str,
                        now: float) -> ControlState:
    """No plan could be made for `target` (it fits nowhere, say): retry after a back-off,
    or at once when the target changes."""
    failures = state.failures + 1 if state.failed == target else 1
    return replace(state, failed=target, failures=failures,
                   retry_at=now + backoff_s(failures), cannot_plan=message)


def record_commit(state: ControlState, target: Target) -> ControlState:
    """A plan for `target` is live: its members are in good standing again."""
    exclusions = {node_id: e for node_id, e in state.exclusions.items()
                  if node_id not in target.members}
    return replace(state, exclusions=exclusions, failed=None, failures=0, retry_at=0.0,
                   cannot_plan="")


def forget_failures(state: ControlState) -> ControlState:
    """An operator asked for a model (`dnet load`): every node gets a fresh chance."""
    return replace(state, exclusions={}, failed=None, failures=0, retry_at=0.0,
                   cannot_plan="")


# ----- what users are told -----------------------------------------------------------------


NO_MODEL_MESSAGE = ("no model is chosen: start a node with --model MODEL, or run "
                    "`dnet load MODEL`")
REPLANNING_MESSAGE = "the mesh is re-planning; please retry"


def unavailable(state: ControlState, view: View, now: float) -> Unavailable | None:
    """Why no ring can serve now, or None while one can.

    A committed ring whose layer holders are all healthy serves (even while a new plan is
    being prepared); otherwise the reason is the first of: no model chosen, the plan cannot
    be made (e.g. memory short by N bytes), every node is excluded, or a plan is on its way.
    """
    running = view.running
    healthy = {m.node_id for m in view.members}
    if running is not None and running.ring and running.ring <= healthy:
        return None
    if not view.model:
        return Unavailable(UnavailableKind.NO_MODEL, NO_MODEL_MESSAGE)
    target = Target(view.model, eligible(state, view, now))
    if state.cannot_plan and state.failed == target:
        return Unavailable(UnavailableKind.CANNOT_PLAN, state.cannot_plan)
    if not target.members:
        reasons = "; ".join(e.describe() for node_id, e in sorted(state.exclusions.items())
                            if node_id in healthy)
        return Unavailable(UnavailableKind.NO_NODE,
                           f"no node can run {view.model}: {reasons}")
    return Unavailable(UnavailableKind.REPLANNING, REPLANNING_MESSAGE)


# ----- the model, and whether a plan change needs a drain -----------------------------------


@dataclass(frozen=True)
class Proposal:
    """A node's --model, as its advert carries it."""

    node_id: str
    started_at: float
    model: str


def desired_model(loaded: str, running: str, own: str, proposals: Iterable[Proposal]) -> str:
    """The cluster's model: the last one loaded with `dnet load`; else the running plan's;
    else this (the coordinator's) node's --model; else the most senior node's proposal."""
    if loaded or running or own:
        return loaded or running or own
    ordered = sorted((p.started_at, p.node_id, p.model) for p in proposals if p.model)
    return ordered[0][2] if ordered else ""


@dataclass(frozen=True)
class Holder:
    """A ring member as the frames see it."""

    node_id: str
    address: str
    layers: tuple[int, ...]
    window: int


@dataclass(frozen=True)
class Layout:
    """Where every layer runs: what must stay put for requests in flight to carry on."""

    model: str
    ring: tuple[Holder, ...]  # the layer holders, in ring order


def needs_drain(running: Layout | None, new: Layout) -> bool:
    """Whether moving from the running ring to `new` must stop and drain the entries.

    Only a plan that keeps every layer on the same node at the same address, with the same
    window, for the same model, leaves requests in flight valid; then it commits without a
    drain (a newcomer the planner leaves out changes nothing for the ring)."""
    return running != new


def failure_of_status(code_name: str) -> FailureKind:
    """The failure a gRPC status (by its StatusCode name) stands for."""
    return {
        "DEADLINE_EXCEEDED": FailureKind.TIMEOUT,
        "UNAVAILABLE": FailureKind.UNREACHABLE,
        "UNAUTHENTICATED": FailureKind.UNREACHABLE,
        "CANCELLED": FailureKind.UNREACHABLE,
        "RESOURCE_EXHAUSTED": FailureKind.OUT_OF_MEMORY,
    }.get(code_name, FailureKind.LOAD_ERROR)
