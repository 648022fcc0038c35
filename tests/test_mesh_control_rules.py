"""The coordinator's decisions (dnet/node/control.py): pure functions, tested exhaustively."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dnet.node import control
from dnet.node.control import (
    BACKOFF_CAP_S,
    ControlState,
    FailureKind,
    Fingerprint,
    Holder,
    Layout,
    Member,
    NodeFailure,
    Proposal,
    Replan,
    RunningPlan,
    Target,
    UnavailableKind,
    View,
    Wait,
    backoff_s,
    decide,
    desired_model,
    needs_drain,
    record_commit,
    record_failures,
    record_plan_failure,
    unavailable,
)
from tests.discovery.strategies import FAST
from tests.purity import imported_roots

QUIET = 2.0
MODEL = "qwen"


def member(node_id: str, started_at: float = 1.0, model: str = "") -> Member:
    return Member(node_id, f"node-{node_id}", Fingerprint(started_at, f"{node_id}-instance",
                                                           model))


A, B, C = member("a"), member("b"), member("c")


def running(*ids: str, ring: tuple[str, ...] | None = None, model: str = MODEL) -> RunningPlan:
    return RunningPlan(1, model, frozenset(ids), frozenset(ring if ring is not None else ids))


def settled(*members: Member, at: float = 0.0) -> ControlState:
    """A state whose quiet period over `members` ended long before `at`."""
    state, _ = decide(ControlState(), View(members, "", None), at - 100, QUIET)
    return state


def fail(node: Member, kind: FailureKind = FailureKind.LOAD_ERROR) -> NodeFailure:
    return NodeFailure(node.node_id, kind, f"{node.node_id} cannot load {MODEL}")


# ----- back-off ------------------------------------------------------------------------------


def test_backoff_doubles_from_two_seconds_and_is_capped() -> None:
    assert [backoff_s(n) for n in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]
    assert backoff_s(0) == backoff_s(1)


@FAST
@given(st.integers(min_value=1, max_value=10_000))
def test_backoff_is_monotone_and_bounded(failures: int) -> None:
    assert backoff_s(failures) <= backoff_s(failures + 1) <= BACKOFF_CAP_S


# ----- decide ----------------------------------------------------------------------------------


def test_no_model_waits_for_a_change() -> None:
    _, action = decide(settled(A), View((A,), "", None), 10, QUIET)
    assert action == Wait(None)


def test_a_first_plan_waits_for_the_quiet_period_then_covers_every_member() -> None:
    state = ControlState()
    state, action = decide(state, View((A,), MODEL, None), 0.0, QUIET)
    assert action == Wait(QUIET)
    state, action = decide(state, View((A, B), MODEL, None), 1.0, QUIET)
    assert action == Wait(1.0 + QUIET), "a join restarts the quiet period"
    state, action = decide(state, View((A, B), MODEL, None), 3.0, QUIET)
    assert action == Replan(Target(MODEL, frozenset({"a", "b"})))


def test_a_node_that_just_started_listens_before_it_plans() -> None:
    listen, most = control.DISCOVERY_S, control.DISCOVERY_MAX_S
    assert control.listening_until(100.0, 100.0, 0) == 100.0 + listen
    assert control.listening_until(100.0, 100.0 + listen - 0.01, 0) == 100.0 + listen
    assert control.listening_until(100.0, 100.0 + listen, 0) is None, "alone: it plans"
    # A peer seen but not yet health-checked holds planning up, but not for ever.
    assert control.listening_until(100.0, 100.0 + listen, 1) == 100.0 + most
    assert control.listening_until(100.0, 100.0 + most, 1) is None
    assert control.listening_until(100.0, 100.0 + 3600, 5) is None


@given(st.floats(0, 1e6), st.floats(0, 100), st.integers(0, 5))
@FAST
def test_listening_ends_by_the_longest_window_and_never_waits_into_the_past(
        started: float, elapsed: float, unchecked: int) -> None:
    until = control.listening_until(started, started + elapsed, unchecked)
    if elapsed >= control.DISCOVERY_MAX_S:
        assert until is None
    if until is not None:
        assert started + elapsed < until <= started + control.DISCOVERY_MAX_S


def test_the_running_plan_for_the_same_members_and_model_means_nothing_to_do() -> None:
    _, action = decide(settled(A, B), View((A, B), MODEL, running("a", "b")), 10, QUIET)
    assert action == Wait(None)


def test_a_new_model_or_a_lost_member_replans() -> None:
    state = settled(A, B)
    _, action = decide(state, View((A, B), "llama", running("a", "b")), 10, QUIET)
    assert action == Replan(Target("llama", frozenset({"a", "b"})))
    state = settled(A)
    _, action = decide(state, View((A,), MODEL, running("a", "b")), 10, QUIET)
    assert action == Replan(Target(MODEL, frozenset({"a"})))


def test_a_failed_node_is_excluded_and_the_mesh_replans_without_it_at_once() -> None:
    state = settled(A, B)
    view = View((A, B), MODEL, running("a"))
    state, action = decide(state, view, 10, QUIET)
    assert action == Replan(Target(MODEL, frozenset({"a", "b"})))
    state = record_failures(state, [fail(B)], view.members, 10)
    assert state.exclusions["b"].failures == 1
    assert state.exclusions["b"].retry_at == 10 + 2
    # Without it, the running ring is already the plan: nothing to drain, nothing to do.
    _, action = decide(state, view, 10, QUIET)
    assert action == Wait(12)
    # At a fresh start the plan goes ahead without it.
    state = record_failures(settled(A, B), [fail(B)], view.members, 10)
    _, action = decide(state, View((A, B), MODEL, None), 10, QUIET)
    assert action == Replan(Target(MODEL, frozenset({"a"})))


def test_retries_back_off_exponentially_while_the_node_keeps_failing() -> None:
    """Drive the decisions over ten minutes with a node that always fails its part."""
    state, view, now = settled(A, B), View((A, B), MODEL, running("a")), 0.0
    attempts = []
    while now < 600:
        state, action = decide(state, view, now, QUIET)
        if isinstance(action, Replan):
            attempts.append(now)
            assert "b" in action.target.members
            state = record_failures(state, [fail(B)], view.members, now)
            continue
        assert action.until is not None and action.until > now
        now = action.until
    gaps = [later - earlier for earlier, later in zip(attempts, attempts[1:], strict=False)]
    assert gaps[:6] == [2, 4, 8, 16, 32, 60]
    assert all(gap == BACKOFF_CAP_S for gap in gaps[5:])
    assert len(attempts) <= 6 + 600 / BACKOFF_CAP_S


@pytest.mark.parametrize("change", ["restart", "new registration", "new model proposal"])
def test_a_node_that_changes_is_retried_before_its_backoff_ends(change: str) -> None:
    state = record_failures(settled(A, B), [fail(B)] * 1, (A, B), 10)
    state = record_failures(state, [fail(B)], (A, B), 13)  # 4 s back-off now
    fingerprint = B.fingerprint
    changed = {"restart": replace(fingerprint, started_at=99.0),
               "new registration": replace(fingerprint, instance="b-other"),
               "new model proposal": replace(fingerprint, model="/other/path")}[change]
    b2 = replace(B, fingerprint=changed)
    state, action = decide(state, View((A, b2), MODEL, running("a")), 14, QUIET)
    assert action == Replan(Target(MODEL, frozenset({"a", "b"})))
    assert "b" not in state.exclusions
    # A failure after the change starts a fresh back-off.
    state = record_failures(state, [fail(b2)], (A, b2), 14)
    assert state.exclusions["b"].failures == 1


def test_load_forgets_every_exclusion_and_a_commit_clears_its_members() -> None:
    state = record_failures(settled(A, B), [fail(A), fail(B)], (A, B), 10)
    assert control.forget_failures(state).exclusions == {}
    state = record_commit(state, Target(MODEL, frozenset({"a"})))
    assert set(state.exclusions) == {"b"}


def test_a_plan_that_cannot_be_made_backs_off_unless_the_target_changes() -> None:
    state = settled(A, B)
    target = Target(MODEL, frozenset({"a", "b"}))
    state = record_plan_failure(state, target, "short by 1000 bytes", 10)
    _, action = decide(state, View((A, B), MODEL, None), 11, QUIET)
    assert action == Wait(12)
    _, action = decide(state, View((A, B), MODEL, None), 12, QUIET)
    assert action == Replan(target)
    state = record_plan_failure(state, target, "short by 1000 bytes", 12)
    assert state.retry_at == 12 + 4
    # A newcomer brings memory: plan again once the quiet period is over, not after 4 s.
    state, action = decide(state, View((A, B, C), MODEL, None), 13, QUIET)
    assert action == Wait(15)
    _, action = decide(state, View((A, B, C), MODEL, None), 15, QUIET)
    assert action == Replan(Target(MODEL, frozenset({"a", "b", "c"})))


@FAST
@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(list(FailureKind)),
                          st.floats(0, 500)), max_size=12),
       st.floats(0, 600), st.sets(st.sampled_from("abc"), min_size=1),
       st.sets(st.sampled_from("abc")))
def test_decisions_never_plan_an_excluded_node_nor_redo_the_running_plan(
        failures, now, present, planned) -> None:
    members = tuple(m for m in (A, B, C) if m.node_id in present)
    state = settled(A, B, C, at=-1000)
    for node_id, kind, at in sorted(failures, key=lambda f: f[2]):
        state = record_failures(state, [NodeFailure(node_id, kind, "x")], (A, B, C), at)
    plan = running(*planned) if planned else None
    _, action = decide(state, View(members, MODEL, plan), now, QUIET)
    if isinstance(action, Replan):
        for node_id in action.target.members:
            exclusion = state.exclusions.get(node_id)
            assert exclusion is None or exclusion.retry_at <= now
        assert plan is None or action.target.members != plan.members
    else:
        assert action.until is None or action.until > now


# ----- unavailable -------------------------------------------------------------------------------


def test_a_healthy_running_ring_serves_even_while_a_plan_fails() -> None:
    state = record_plan_failure(settled(A, B), Target(MODEL, frozenset("ab")), "short", 1)
    assert unavailable(state, View((A, B), MODEL, running("a", "b", ring=("a",))), 2) is None


def test_why_no_ring_can_serve() -> None:
    no_model = unavailable(settled(A), View((A,), "", None), 1)
    assert no_model.kind is UnavailableKind.NO_MODEL and "--model" in no_model.message
    state = record_plan_failure(settled(A), Target(MODEL, frozenset("a")),
                                "cannot run qwen: 1234 bytes short", 1)
    short = unavailable(state, View((A,), MODEL, None), 2)
    assert short.kind is UnavailableKind.CANNOT_PLAN and "1234 bytes" in short.message
    state = record_failures(settled(A, B), [fail(A), fail(B, FailureKind.OUT_OF_MEMORY)],
                            (A, B), 1)
    nobody = unavailable(state, View((A, B), MODEL, None), 2)
    assert nobody.kind is UnavailableKind.NO_NODE
    assert "node-a: load error" in nobody.message and "node-b: out of memory" in nobody.message
    replanning = unavailable(settled(A, B), View((A,), MODEL, running("a", "b")), 2)
    assert replanning.kind is UnavailableKind.REPLANNING


# ----- the model, drains, failures --------------------------------------------------------------


def test_desired_model_precedence() -> None:
    proposals = [Proposal("b", 2.0, "senior-later"), Proposal("a", 1.0, "senior"),
                 Proposal("c", 0.5, "")]
    assert desired_model("loaded", "running", "own", proposals) == "loaded"
    assert desired_model("", "running", "own", proposals) == "running"
    assert desired_model("", "", "own", proposals) == "own"
    assert desired_model("", "", "", proposals) == "senior"
    assert desired_model("", "", "", []) == ""


def ring(*holders: tuple[str, str, tuple[int, ...], int], model: str = MODEL) -> Layout:
    return Layout(model, tuple(Holder(*h) for h in holders))


def test_only_a_plan_that_moves_nothing_skips_the_drain() -> None:
    old = ring(("a", "h:1", (0, 1), 2), ("b", "h:2", (2, 3), 2))
    assert not needs_drain(old, ring(("a", "h:1", (0, 1), 2), ("b", "h:2", (2, 3), 2)))
    assert needs_drain(None, old)
    assert needs_drain(old, ring(("a", "h:1", (0, 1), 2), ("b", "h:2", (2, 3), 1)))
    assert needs_drain(old, ring(("a", "h:1", (0, 1, 2), 3), ("b", "h:2", (3,), 1)))
    assert needs_drain(old, ring(("a", "h:9", (0, 1), 2), ("b", "h:2", (2, 3), 2)))
    assert needs_drain(old, ring(("b", "h:2", (2, 3), 2), ("a", "h:1", (0, 1), 2)))
    assert needs_drain(old, ring(("a", "h:1", (0, 1), 2), ("b", "h:2", (2, 3), 2),
                                 model="llama"))


def test_grpc_statuses_map_to_failure_kinds() -> None:
    assert control.failure_of_status("DEADLINE_EXCEEDED") is FailureKind.TIMEOUT
    assert control.failure_of_status("UNAVAILABLE") is FailureKind.UNREACHABLE
    assert control.failure_of_status("RESOURCE_EXHAUSTED") is FailureKind.OUT_OF_MEMORY
    assert control.failure_of_status("FAILED_PRECONDITION") is FailureKind.LOAD_ERROR


def test_the_decisions_import_nothing_that_does_io() -> None:
    source = Path(control.__file__).read_text()
    assert not imported_roots(source) & {"grpc", "socket", "threading", "time", "asyncio",
                                         "mlx", "zeroconf", "concurrent", "subprocess"}
