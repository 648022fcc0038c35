"""Coordinator election and duplicate node-id resolution."""

from __future__ import annotations

import math
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from discovery.election import (
    Candidate,
    candidate_of,
    duplicate_loser,
    duplicate_loser_info,
    elect,
    membership_changed,
)
from discovery.peers import PeerState, is_healthy
from tests.discovery.strategies import FAST, ipv4s, peer_info, peer_infos, peer_states, ports

candidates = st.builds(
    Candidate,
    node_id=st.sampled_from(["aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc", "eeeeeeeeeeee"]),
    started_at=st.one_of(st.floats(0, 100), st.just(math.nan), st.just(math.inf)),
    leads_epoch=st.integers(-1, 4),
)
mixed = st.lists(st.one_of(candidates, peer_states()), max_size=8)


def healthy_state(node_id: str, started_at: float, leads_epoch: int = 0) -> PeerState:
    info = peer_info(node_id, started_at=started_at)
    return PeerState(info, 0.0, 0.0, 0, leads_epoch, leads_epoch, verified=True)


def test_nobody_to_elect() -> None:
    assert elect([]) is None
    unhealthy = replace(healthy_state("aaaaaaaaaaaa", 1.0), failures=2)
    assert elect([unhealthy]) is None


def test_most_senior_wins_without_a_coordinator() -> None:
    assert elect([Candidate("bbbbbbbbbbbb", 5.0), healthy_state("aaaaaaaaaaaa", 7.0)]) == (
        "bbbbbbbbbbbb"
    )
    # Same start time: the lower node id.
    assert elect([Candidate("bbbbbbbbbbbb", 5.0), Candidate("aaaaaaaaaaaa", 5.0)]) == (
        "aaaaaaaaaaaa"
    )


def test_a_skewed_newcomer_does_not_unseat_the_running_coordinator() -> None:
    coordinator = healthy_state("bbbbbbbbbbbb", 100.0, leads_epoch=3)
    newcomer = Candidate("aaaaaaaaaaaa", 1.0)  # its clock says it started long ago
    assert elect([newcomer, coordinator]) == "bbbbbbbbbbbb"


def test_the_newest_plan_wins_between_two_claimants() -> None:
    old = healthy_state("aaaaaaaaaaaa", 1.0, leads_epoch=2)
    new = healthy_state("bbbbbbbbbbbb", 9.0, leads_epoch=5)
    assert elect([old, new]) == "bbbbbbbbbbbb"
    tie = healthy_state("cccccccccccc", 0.5, leads_epoch=5)
    assert elect([old, new, tie]) == "cccccccccccc"


def test_when_the_coordinator_turns_unhealthy_the_next_one_takes_over() -> None:
    coordinator = healthy_state("cccccccccccc", 9.0, leads_epoch=4)
    others = [healthy_state("bbbbbbbbbbbb", 3.0), Candidate("aaaaaaaaaaaa", 5.0)]
    assert elect([coordinator, *others]) == "cccccccccccc"
    assert elect([replace(coordinator, failures=2), *others]) == "bbbbbbbbbbbb"
    assert elect(others[1:]) == "aaaaaaaaaaaa"


@FAST
@given(mixed, st.randoms(use_true_random=False))
def test_election_ignores_input_order(pool: list, rnd) -> None:
    shuffled = list(pool)
    rnd.shuffle(shuffled)
    assert elect(pool) == elect(shuffled)


@FAST
@given(mixed)
def test_the_winner_is_a_healthy_candidate_with_the_highest_claim(pool: list) -> None:
    standing = [
        c if isinstance(c, Candidate) else candidate_of(c)
        for c in pool
        if isinstance(c, Candidate) or is_healthy(c)
    ]
    winner = elect(pool)
    if not standing:
        assert winner is None
        return
    assert winner in {c.node_id for c in standing}
    best_claim = max(max(c.leads_epoch, 0) for c in standing)
    assert any(c.node_id == winner and max(c.leads_epoch, 0) == best_claim for c in standing)


@FAST
@given(mixed, candidates)
def test_a_newcomer_never_unseats_a_healthy_coordinator(pool: list, newcomer: Candidate) -> None:
    winner = elect(pool)
    claimed = [c for c in pool if isinstance(c, Candidate) or is_healthy(c)]
    leads = {
        (c.node_id if isinstance(c, Candidate) else c.info.node_id): c.leads_epoch for c in claimed
    }
    if winner is None or leads.get(winner, 0) <= 0 or newcomer.node_id in leads:
        return
    # A newcomer has no plan to lead yet.
    assert elect([*pool, replace(newcomer, leads_epoch=0)]) == winner


def test_later_starter_loses_a_duplicate_id() -> None:
    first = peer_info(
        "aaaaaaaaaaaa", started_at=10.0, instance="x-aaaaaaaaaaaa._dnet_p2p._tcp.local."
    )
    second = replace(first, started_at=20.0, address="10.0.0.7", instance="y")
    assert duplicate_loser(first, second) == "y"
    assert duplicate_loser(second, first) == "y"


def test_duplicate_tie_goes_against_the_larger_address_port_instance() -> None:
    a = peer_info("aaaaaaaaaaaa", address="10.0.0.2", grpc_port=1, instance="i1")
    b = replace(a, address="10.0.0.1", grpc_port=9, instance="i2")
    assert duplicate_loser(a, b) == "i1"
    c = replace(a, grpc_port=2, instance="i1")  # same instance name on two ports
    assert duplicate_loser_info(a, c) == c


def test_no_duplicate_between_one_registration_or_two_ids() -> None:
    a = peer_info("aaaaaaaaaaaa")
    assert duplicate_loser(a, replace(a, model="new model")) is None
    assert duplicate_loser(a, peer_info("bbbbbbbbbbbb", address="10.0.0.9")) is None


@FAST
@given(peer_infos(), st.floats(0, 4e9), ipv4s, ports, st.sampled_from(["p", "q"]))
def test_duplicate_resolution_is_symmetric_and_picks_one_of_the_two(
    a, started_at: float, address: str, port: int, instance: str
) -> None:
    b = replace(a, started_at=started_at, address=address, grpc_port=port, instance=instance)
    loser = duplicate_loser_info(a, b)
    assert loser == duplicate_loser_info(b, a)
    same = (a.address, a.grpc_port, a.instance) == (b.address, b.grpc_port, b.instance)
    assert (loser is None) == same
    if loser is not None:
        assert loser in (a, b)
        winner = b if loser == a else a
        assert winner.started_at <= loser.started_at


def test_membership_changed() -> None:
    assert not membership_changed(["a", "b"], {"b", "a"})
    assert membership_changed(["a", "b"], ["a"])
    assert membership_changed([], ["a"])
