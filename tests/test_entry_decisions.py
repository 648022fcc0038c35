"""The entry's decisions (dnet/entry/decisions.py), exhaustively: admission, the ring a request
may start or be replayed on, the steps that carry a prompt, and what to do with each token."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dnet.entry import decisions
from dnet.entry.decisions import MAX_REPLAYS, RingView, Verdict
from dnet.proto import dnet_ring_pb2 as pb


def test_admission_refuses_without_a_sink_then_at_the_cap() -> None:
    for max_requests in range(0, 4):
        for active in range(0, 5):
            for listening in (False, True):
                refusal = decisions.admission(active, max_requests, listening)
                if not listening:
                    assert refusal is not None and refusal.status == 503
                elif active >= max_requests:
                    assert refusal is not None and refusal.status == 429
                    assert f"--max-requests {max_requests}" in refusal.message
                else:
                    assert refusal is None


views = st.builds(RingView, st.sampled_from(["", "a:1", "b:2"]), st.integers(0, 5),
                  st.booleans())


@given(views, st.integers(0, 5))
def test_a_new_request_needs_an_admitting_ring_and_a_replay_a_newer_one(view, failed) -> None:
    assert decisions.admits(view) is view.admitting
    assert decisions.replaces(failed, view) is (view.admitting and view.epoch > failed)


def test_only_broken_rings_are_replayed_in_recovery_mode_a_few_times() -> None:
    for recover in (False, True):
        for status in (400, 429, 500, 502, 503, 504):
            for failures in range(1, MAX_REPLAYS + 3):
                replay = decisions.should_replay(recover, status, failures)
                assert replay is (recover and status in (502, 503) and failures <= MAX_REPLAYS)


@given(st.integers(1, 500), st.integers(0, 499))
def test_a_replay_asks_for_what_is_left_and_skips_the_draws_made(max_tokens, generated) -> None:
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=9)
    params = decisions.replay_sampling(sampling, generated)
    if not generated:
        assert params is sampling
        return
    assert params.max_tokens == max_tokens - generated and params.draws_done == generated
    assert params.seed == 9 and params.temperature == pytest.approx(0.7)
    assert sampling.draws_done == 0  # the request's own parameters are left alone


@given(st.lists(st.integers(0, 100), min_size=1, max_size=60),
       st.lists(st.integers(0, 100), max_size=10), st.integers(1, 16))
def test_prompt_steps_are_mlx_lms_steps(prompt, generated, chunk) -> None:
    view = RingView("head:1", 4, True)
    sampling = pb.SamplingParams(max_tokens=7)
    steps = decisions.prompt_steps("r", prompt, generated, sampling, entry="me:2", view=view,
                                   chunk=chunk)
    # Together the steps carry the prompt, then each generated token, in order.
    assert [t for step in steps for t in step.tokens] == prompt + generated
    # Chunks of the prompt but its last token fill the caches; then one token per step.
    prefix_steps = steps[:len(steps) - 1 - len(generated)]
    assert all(len(step.tokens) <= chunk for step in prefix_steps)
    assert sum(len(step.tokens) for step in prefix_steps) == len(prompt) - 1
    assert all(len(step.tokens) == 1 for step in steps[len(prefix_steps):])
    # Only the last step is sampled; positions follow the tokens; only position 0 opens.
    assert [step.sample for step in steps] == [False] * (len(steps) - 1) + [True]
    position = 0
    for step in steps:
        assert step.position == position
        assert (step.opening is not None) == (position == 0)
        position += len(step.tokens)
        assert (step.request_id, step.layer, step.hidden, step.entry, step.head, step.epoch) == (
            "r", 0, None, "me:2", "head:1", 4)
    assert steps[0].opening is not None and steps[0].opening.sampling is sampling


def test_a_request_needs_a_prompt() -> None:
    with pytest.raises(ValueError):
        decisions.prompt_steps("r", [], [], pb.SamplingParams(), entry="e",
                               view=RingView("h", 0, True))


@given(st.integers(0, 10), st.integers(0, 10), st.text(max_size=3), st.integers(0, 599))
def test_tokens_are_emitted_once_in_order_and_errors_fail(index, expected, error, code) -> None:
    token = pb.Token(index=index, error=error, error_code=code)
    verdict = decisions.judge(token, expected)
    if error:
        assert verdict is Verdict.FAIL
        assert decisions.failure_status(token) == (code or 503)
    elif index < expected:
        assert verdict is Verdict.SKIP
    else:
        assert verdict is Verdict.EMIT


def test_decode_speed_is_a_moving_average_of_the_gaps() -> None:
    assert decisions.next_moving_average(0.0, 0.5) == 0.5
    assert decisions.next_moving_average(1.0, 0.5) == pytest.approx(0.9)
