"""The pure peer table: admission, liveness, health and expiry."""

from __future__ import annotations

import copy
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from discovery.peers import (
    FAILURES_BEFORE_UNHEALTHY,
    HEALTH_CHECK_INTERVAL_S,
    PEER_TIMEOUT_S,
    PeerInfo,
    PeerState,
    admit_missing,
    expire,
    healthy,
    is_healthy,
    mark_alive,
    mark_failed,
    registration_conflict,
    remove_instance,
    same_cluster,
    upsert,
)
from tests.discovery.strategies import (
    CLUSTER,
    FAST,
    OTHER_CLUSTER,
    peer_info,
    peer_infos,
    small_node_ids,
)

A = peer_info("aaaaaaaaaaaa")
B = peer_info("bbbbbbbbbbbb", address="10.0.0.2")


def test_peer_info_addresses() -> None:
    assert A.grpc_address == "10.0.0.1:58080"
    assert A.http_url == "http://10.0.0.1:8080"


def test_upsert_admits_a_new_peer_unverified_and_so_not_yet_healthy() -> None:
    table = upsert({}, A, now=5.0, cluster_id=CLUSTER)
    state = table[A.node_id]
    assert (state.first_seen, state.last_alive, state.failures, state.epoch) == (5.0, 5.0, 0, 0)
    assert state.leads_epoch == 0 and not state.verified
    assert healthy(table) == []
    assert healthy(mark_alive(table, A.node_id, 6.0, epoch=0, leads_epoch=0)) == [A]


def test_upsert_ignores_other_clusters() -> None:
    foreign = replace(A, cluster_id=OTHER_CLUSTER)
    assert not same_cluster(foreign, CLUSTER)
    assert upsert({}, foreign, now=1.0, cluster_id=CLUSTER) == {}


def test_txt_update_keeps_health_history() -> None:
    table = mark_alive(upsert({}, A, 1.0, CLUSTER), A.node_id, 2.0, epoch=3, leads_epoch=3)
    table = mark_failed(table, A.node_id, 3.0)
    updated = upsert(table, replace(A, model="qwen3", memory_budget_bytes=1), 4.0, CLUSTER)
    state = updated[A.node_id]
    assert state.info.model == "qwen3"
    assert (state.first_seen, state.last_alive, state.failures) == (1.0, 4.0, 1)
    assert (state.epoch, state.leads_epoch, state.verified) == (3, 3, True)


def test_a_new_registration_under_a_known_id_replaces_the_entry() -> None:
    table = mark_alive(upsert({}, A, 1.0, CLUSTER), A.node_id, 2.0, epoch=3, leads_epoch=3)
    for moved in [
        replace(A, address="10.0.0.9"),
        replace(A, grpc_port=1234),
        replace(A, instance="other._dnet_p2p._tcp.local."),
        replace(A, started_at=A.started_at + 60),
    ]:
        assert registration_conflict(table, moved) == A
        state = upsert(table, moved, 9.0, CLUSTER)[A.node_id]
        assert state.info == moved
        assert (state.first_seen, state.epoch, state.leads_epoch, state.verified) == (
            9.0,
            0,
            0,
            False,
        )
    assert registration_conflict(table, replace(A, model="m")) is None
    assert registration_conflict({}, A) is None


def test_goodbye_removes_only_that_registration() -> None:
    table = upsert(upsert({}, A, 1.0, CLUSTER), B, 1.0, CLUSTER)
    assert set(remove_instance(table, A.instance)) == {B.node_id}
    assert remove_instance(table, "unknown._dnet_p2p._tcp.local.") == table


def test_unknown_node_ids_are_left_alone() -> None:
    table = upsert({}, A, 1.0, CLUSTER)
    assert mark_alive(table, "ffffffffffff", 2.0, 1, 1) == table
    assert mark_failed(table, "ffffffffffff", 2.0) == table


def test_two_failed_checks_make_a_peer_unhealthy_and_one_success_heals_it() -> None:
    assert FAILURES_BEFORE_UNHEALTHY == 2
    table = mark_alive(upsert({}, A, 0.0, CLUSTER), A.node_id, 1.0, 1, 0)
    table = mark_failed(table, A.node_id, 2.0)
    assert healthy(table) == [A]  # one lost check is tolerated
    table = mark_failed(table, A.node_id, 3.0)
    assert healthy(table) == []
    assert table[A.node_id].last_alive == 1.0 and table[A.node_id].last_checked == 3.0
    table = mark_alive(table, A.node_id, 4.0, 2, 2)
    assert healthy(table) == [A]
    assert (table[A.node_id].failures, table[A.node_id].epoch, table[A.node_id].leads_epoch) == (
        0,
        2,
        2,
    )


def test_a_dead_peer_is_gone_within_ten_seconds_of_ticks() -> None:
    table = mark_alive(upsert({}, A, 0.0, CLUSTER), A.node_id, 0.5, 0, 0)
    died_at = 0.7
    now = died_at
    while A.node_id in table:
        now += HEALTH_CHECK_INTERVAL_S
        table = expire(mark_failed(table, A.node_id, now), now)
    assert now - died_at <= 10.0


@FAST
@given(st.floats(0, 100), st.floats(0, 100), st.floats(0.1, 20))
def test_expire_keeps_exactly_the_recently_alive(
    last_alive: float, now: float, timeout_s: float
) -> None:
    table = {A.node_id: PeerState(A, 0.0, last_alive, 0, 0, 0)}
    assert (A.node_id in expire(table, now, timeout_s)) == (now - last_alive < timeout_s)
    assert (A.node_id in expire(table, now)) == (now - last_alive < PEER_TIMEOUT_S)


def test_admit_missing_readmits_dropped_peers_without_refreshing_known_ones() -> None:
    table = upsert({}, A, 1.0, CLUSTER)
    foreign = replace(B, cluster_id=OTHER_CLUSTER)
    readmitted = admit_missing(table, [A, B, foreign], 7.0, CLUSTER)
    assert readmitted[A.node_id] == table[A.node_id]
    assert readmitted[B.node_id].first_seen == 7.0 and not readmitted[B.node_id].verified
    assert set(readmitted) == {A.node_id, B.node_id}


# One random operation on the table: (kind, advert, time step).
operations = st.tuples(
    st.sampled_from(["upsert", "remove", "alive", "failed", "expire", "admit"]),
    peer_infos(small_node_ids),
    st.floats(0, 3),
    st.integers(0, 4),
)


@FAST
@given(st.lists(operations, max_size=40))
def test_table_invariants_hold_under_any_sequence_of_events(
    events: list[tuple[str, PeerInfo, float, int]],
) -> None:
    table: dict[str, PeerState] = {}
    now = 0.0
    for kind, info, dt, epoch in events:
        now += dt
        before = copy.deepcopy(table)
        if kind == "upsert":
            new = upsert(table, info, now, CLUSTER)
        elif kind == "remove":
            new = remove_instance(table, info.instance)
        elif kind == "alive":
            new = mark_alive(table, info.node_id, now, epoch, epoch)
        elif kind == "failed":
            new = mark_failed(table, info.node_id, now)
        elif kind == "admit":
            new = admit_missing(table, [info], now, CLUSTER)
        else:
            new = expire(table, now)
        assert table == before, "functions must not mutate their input"
        assert new is not table
        table = new
        for node_id, state in table.items():
            assert state.info.node_id == node_id
            assert state.info.cluster_id == CLUSTER
            assert state.failures >= 0
            assert state.first_seen <= state.last_alive <= now
        listed = healthy(table)
        assert [info.node_id for info in listed] == sorted(
            s.info.node_id for s in table.values() if is_healthy(s)
        )
