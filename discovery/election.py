"""Coordinator election, duplicate node-id resolution and re-plan debouncing. Pure.

Election rule, applied by every node to its own view every tick:

1. Only healthy candidates count; each node includes itself as a `Candidate`.
2. If any candidate says it coordinates a plan (`leads_epoch > 0`), the one with the highest
   `leads_epoch` wins: a running coordinator keeps its job, so a newcomer never unseats it
   and triggers a needless re-plan. Two claimants (after a partition heals) resolve to the
   newest plan, whose coordinator has the most recent view of the ring.
3. Otherwise the most senior node wins: lowest `(started_at, node_id)`. Seniority is read
   from each node's own clock, so under clock skew "most senior" is arbitrary but still
   identical on every node; rule 2 is what keeps a coordinator in place once one exists.

Everything is a total order on values every node sees alike (ties end at node_id), so nodes
with the same table agree whatever the input order. When the coordinator expires or turns
unhealthy it drops out of the candidates and re-running `elect` picks the next one.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from discovery.peers import PeerInfo, PeerState, is_healthy


@dataclass(frozen=True)
class Candidate:
    """A node standing for election that is healthy by construction (typically the caller)."""

    node_id: str
    started_at: float
    leads_epoch: int = 0


def candidate_of(state: PeerState) -> Candidate:
    return Candidate(state.info.node_id, state.info.started_at, state.leads_epoch)


def _seniority(started_at: float) -> float:
    # NaN compares false with everything and would make the order depend on input order;
    # a node with a non-finite start time is simply the most junior.
    return started_at if math.isfinite(started_at) else math.inf


def _election_key(candidate: Candidate) -> tuple[int, float, str]:
    # Smallest key wins: highest leads_epoch first (non-leaders all tie at 0), then seniority.
    return (-max(candidate.leads_epoch, 0), _seniority(candidate.started_at), candidate.node_id)


def elect(candidates: Iterable[Candidate | PeerState]) -> str | None:
    """The coordinator's node id among the healthy candidates, or None if there are none.

    `PeerState`s that are not healthy are ignored; `Candidate`s are taken as healthy.
    """
    standing = [
        candidate if isinstance(candidate, Candidate) else candidate_of(candidate)
        for candidate in candidates
        if isinstance(candidate, Candidate) or is_healthy(candidate)
    ]
    if not standing:
        return None
    return min(standing, key=_election_key).node_id


def _registration_key(info: PeerInfo) -> tuple[str, int, str]:
    return (info.address, info.grpc_port, info.instance)


def registration_rank(info: PeerInfo) -> tuple[float, str, int, str]:
    """Order of registrations sharing a node id: the smallest keeps the id, the others lose."""
    return (_seniority(info.started_at), *_registration_key(info))


def duplicate_loser_info(a: PeerInfo, b: PeerInfo) -> PeerInfo | None:
    """Of two registrations sharing a node id, the one that must take a new id.

    The later starter loses, so the node that other nodes have known longest keeps its id
    (and any plan naming it stays valid); on a tie the larger (address, grpc_port, instance)
    loses. None when the node ids differ or both adverts are the same registration.
    """
    if a.node_id != b.node_id or _registration_key(a) == _registration_key(b):
        return None
    return max((a, b), key=registration_rank)


def duplicate_loser(a: PeerInfo, b: PeerInfo) -> str | None:
    """The `instance` of the registration that must take a new id (see `duplicate_loser_info`).

    Two registrations can share an instance name (same host name and node id on two machines);
    then compare the whole advert from `duplicate_loser_info` to tell which one lost.
    """
    loser = duplicate_loser_info(a, b)
    return None if loser is None else loser.instance


def membership_changed(planned_ids: Collection[str], healthy_ids: Collection[str]) -> bool:
    """Whether the healthy members differ from the members of the current plan."""
    return set(planned_ids) != set(healthy_ids)


RE_PLAN_QUIET_S = 2.0


@dataclass(frozen=True)
class Debounce:
    """State of the re-plan debouncer: feed it the member set every tick via `step`."""

    pending: frozenset[str] | None = None  # the member set seen at the last step
    changed_at: float = 0.0  # monotonic time `pending` took its current value
    fired: frozenset[str] | None = None  # the member set of the last fire, None before any


def step(
    debounce: Debounce, members: frozenset[str], now: float, quiet_s: float = RE_PLAN_QUIET_S
) -> tuple[Debounce, bool]:
    """Advance the debouncer; fire once the member set has stayed unchanged for `quiet_s` and
    differs from the set of the last fire, so a burst of joins yields one re-plan."""
    if members != debounce.pending:
        debounce = Debounce(pending=members, changed_at=now, fired=debounce.fired)
    if members != debounce.fired and now - debounce.changed_at >= quiet_s:
        return Debounce(pending=members, changed_at=debounce.changed_at, fired=members), True
    return debounce, False
