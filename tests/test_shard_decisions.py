"""A shard's decisions (dnet/shard/decisions.py), exhaustively: pure functions, time passed in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dnet.ring.frames import Status
from dnet.shard import decisions
from dnet.shard.decisions import Move


def test_after_a_run_activations_go_on_until_the_model_ends() -> None:
    for num_layers in range(1, 6):
        for end in range(1, num_layers + 1):
            for sample in (False, True):
                move = decisions.after_run(end, num_layers, sample)
                if end < num_layers:
                    assert move is Move.FORWARD
                else:
                    assert move is (Move.SAMPLE if sample else Move.FILL_CACHE)


@st.composite
def rings(draw: st.DrawFn) -> tuple[int, list[list[tuple[int, int]]]]:
    """A model's layers cut into runs, dealt out to shards (a shard may get several runs)."""
    num_layers = draw(st.integers(1, 12))
    cuts = sorted(draw(st.sets(st.integers(1, num_layers - 1), max_size=num_layers - 1))
                  ) if num_layers > 1 else []
    bounds = [0, *cuts, num_layers]
    runs = list(zip(bounds, bounds[1:], strict=False))
    shards = draw(st.integers(1, len(runs)))
    owner = [i % shards for i in range(len(runs))]
    return num_layers, [[r for r, o in zip(runs, owner, strict=True) if o == s]
                        for s in range(shards)]


def run_ends(runs: list[tuple[int, int]]) -> dict[int, int]:
    return {layer: end for start, end in runs for layer in range(start, end)}


@given(rings())
def test_a_release_from_the_head_visits_every_run_once_in_ring_order(ring) -> None:
    num_layers, shards = ring
    holder = {start: s for s, runs in enumerate(shards) for start, _ in runs}
    visited, layer = [], 0
    while layer is not None:
        shard = holder[layer]
        visited.append(layer)
        layer = decisions.release_onward(layer, run_ends(shards[shard]), num_layers)
        assert len(visited) <= num_layers
    assert visited == sorted(holder)


@given(rings(), st.integers(-2, 14))
def test_a_release_for_this_shard_only_or_for_a_layer_not_held_stops_here(ring, layer) -> None:
    num_layers, shards = ring
    ends = run_ends(shards[0])
    assert decisions.release_onward(None, ends, num_layers) is None
    onward = decisions.release_onward(layer, ends, num_layers)
    if layer not in ends:
        assert onward is None
    else:
        assert onward is None or (ends[layer] == onward < num_layers)


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.one_of(st.none(), st.integers(0, 10**6)))
def test_kv_admission_keeps_the_reserved_total_under_the_cap(need, reserved, cap) -> None:
    refusal = decisions.admit_kv(need, reserved, cap)
    if not cap or reserved + need <= cap:
        assert refusal is None
    else:
        assert refusal is not None and (refusal.need, refusal.reserved, refusal.cap) == (
            need, reserved, cap)
        assert f"needs {need} bytes" in refusal.message
        assert f"{cap - reserved} of {cap} are free" in refusal.message


def test_a_rejection_by_a_replanned_or_restarted_shard_is_retryable() -> None:
    assert decisions.rejection_status(Status.FAILED_PRECONDITION) == 503
    assert decisions.rejection_status(Status.NOT_FOUND) == 503
    for code in range(17):
        if code not in (Status.FAILED_PRECONDITION, Status.NOT_FOUND):
            assert decisions.rejection_status(code) == 500


@given(st.integers(0, 100), st.integers(0, 100), st.integers(0, 20))
def test_a_step_runs_only_at_the_position_its_layer_expects(expected, got, layer) -> None:
    error = decisions.position_error(expected, got, layer)
    assert (error is None) == (expected == got)
    if error is not None:
        assert str(expected) in error and str(got) in error


times = st.floats(0, 1e6, allow_nan=False)


@given(st.dictionaries(st.text(max_size=3), times), times, st.floats(0.1, 1e3))
def test_exactly_the_requests_idle_longer_than_the_ttl_expire(last_used, now, ttl) -> None:
    gone = decisions.expired(last_used, now, ttl)
    assert set(gone) == {r for r, used in last_used.items() if now - used > ttl}


@given(st.lists(times, min_size=1), st.floats(0.1, 1e3))
def test_waking_at_the_expiry_deadline_expires_the_oldest_and_no_earlier(uses, ttl) -> None:
    last_used = {str(i): used for i, used in enumerate(uses)}
    deadline = decisions.expiry_deadline(min(uses), ttl)
    assert deadline is not None
    assert str(uses.index(min(uses))) in decisions.expired(last_used, deadline, ttl)
    assert decisions.expired(last_used, deadline - 2e-3, ttl) == []


def test_with_nothing_to_expire_there_is_nothing_to_wake_for() -> None:
    assert decisions.expiry_deadline(None, 5.0) is None
    assert decisions.next_wake([None, None]) is None
    assert decisions.next_wake([None, 3.0, 2.0]) == 2.0
