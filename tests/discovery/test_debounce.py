"""The re-plan debouncer: one fire per settled member set."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from discovery.election import RE_PLAN_QUIET_S, Debounce, step
from tests.discovery.strategies import FAST

AB = frozenset({"a", "b"})
ABC = frozenset({"a", "b", "c"})


def run(ticks: list[tuple[float, frozenset[str]]]) -> list[tuple[float, frozenset[str]]]:
    debounce, fires = Debounce(), []
    for now, members in ticks:
        debounce, fire = step(debounce, members, now)
        if fire:
            fires.append((now, members))
    return fires


def test_a_burst_of_joins_yields_one_fire_after_the_quiet_period() -> None:
    assert RE_PLAN_QUIET_S == 2.0
    ticks = [(0.0, frozenset({"a"})), (0.5, AB), (1.0, ABC)] + [
        (1.0 + 0.5 * i, ABC) for i in range(1, 10)
    ]
    assert run(ticks) == [(3.0, ABC)]


def test_returning_to_the_fired_set_does_not_fire() -> None:
    ticks = [(0.0, AB), (2.0, AB), (3.0, ABC), (4.0, AB), (10.0, AB)]
    assert run(ticks) == [(2.0, AB)]


def test_a_set_that_changes_back_and_forth_fires_each_settled_change() -> None:
    ticks = [(0.0, AB), (2.0, AB), (3.0, ABC), (5.0, ABC), (6.0, AB), (8.5, AB)]
    assert run(ticks) == [(2.0, AB), (5.0, ABC), (8.5, AB)]


member_sets = st.frozensets(st.sampled_from("abcd"), max_size=4)
event_streams = st.lists(st.tuples(st.floats(0.0, 3.0), member_sets), max_size=40)


@FAST
@given(event_streams)
def test_never_fires_twice_in_a_row_for_one_set_nor_before_quiet(
    events: list[tuple[float, frozenset[str]]],
) -> None:
    debounce, now = Debounce(), 0.0
    last_fired: frozenset[str] | None = None
    previous: frozenset[str] | None = None
    run_started_at = 0.0
    for dt, members in events:
        now += dt
        if members != previous:
            previous, run_started_at = members, now
        debounce, fire = step(debounce, members, now)
        if fire:
            assert members != last_fired
            last_fired = members
            # Unchanged for the whole quiet period before this tick.
            assert now - run_started_at >= RE_PLAN_QUIET_S


@FAST
@given(event_streams, st.floats(0.1, 1.0))
def test_always_fires_once_the_set_settles_unless_it_was_the_last_fired(
    events: list[tuple[float, frozenset[str]]], tick: float
) -> None:
    debounce, now, last_fired = Debounce(), 0.0, None
    for dt, members in events:
        now += dt
        debounce, fire = step(debounce, members, now)
        last_fired = members if fire else last_fired
    if not events:
        return
    final = events[-1][1]
    settle_by = now + RE_PLAN_QUIET_S
    fires = 0
    while now <= settle_by + tick:
        now += tick
        debounce, fire = step(debounce, final, now)
        fires += fire
    assert fires == (0 if final == last_fired else 1)
