"""The request path in one process: entry, head, middle, tail, release, replay.

Real shard runtimes on a generated Qwen3 and a real entry, wired by an in-memory network
(`tests/inprocess.py`): what a user notices (the tokens equal mlx-lm's, caches are freed
however a request ends, a dead shard fails or replays the request) without a socket.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from pathlib import Path

import pytest

from dnet.entry import RingError, Timeouts
from dnet.proto import dnet_ring_pb2 as pb
from tests.conftest import reference_tokens
from tests.inprocess import ENTRY, InProcessRing, failure_of, sampling, wait_for

VOCAB = 512
RINGS = {
    "1-shard": [list(range(8))],
    "2-shards": [[0, 1, 2, 3], [4, 5, 6, 7]],
    # Three shards, two rounds; the tail (layer 7) sits in the middle of the ring order.
    "3-shards-multi-round": [[0, 1, 6], [2, 3, 7], [4, 5]],
}


def assert_diverse(reference: list[int]) -> None:
    # A broken ring can still "match" a reference that repeats one token.
    assert len(set(reference)) >= max(4, len(reference) // 3), reference


def prompt_of(length: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(length)]


@pytest.fixture
def ring(qwen3_model: Path):
    with InProcessRing(qwen3_model, RINGS["2-shards"]) as ring:
        yield ring


@pytest.mark.parametrize("name", list(RINGS))
def test_tokens_match_mlx_lm(name: str, qwen3_model: Path) -> None:
    # Chunks of 16 make a 40-token prompt three prefill steps, as mlx-lm's would be with
    # the same chunk size; mlx-lm's chunk is 2048, so compare with prompts under both.
    with InProcessRing(qwen3_model, RINGS[name]) as ring:
        for length in (1, 17, 300):
            prompt = prompt_of(length, seed=length)
            reference = reference_tokens(qwen3_model, prompt, 24, ignore_eos=True)
            assert_diverse(reference)
            assert ring.complete(prompt, 24) == reference, f"prompt of {length} tokens"
        ring.wait_idle()


def test_seeded_sampling_and_penalties_match_mlx_lm(ring: InProcessRing,
                                                    qwen3_model: Path) -> None:
    prompt = prompt_of(12, seed=3)
    options = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "min_p": 0.02}
    reference = reference_tokens(qwen3_model, prompt, 24, ignore_eos=True, seed=1234,
                                 **{"temperature": 0.9, "top_p": 0.95, "top_k": 50,
                                    "min_p": 0.02})
    assert_diverse(reference)
    assert ring.complete(prompt, 24, seed=1234, **options) == reference
    assert ring.complete(prompt, 24, seed=4321, **options) != reference
    penalised = reference_tokens(qwen3_model, prompt, 24, ignore_eos=True,
                                 repetition_penalty=1.5)
    assert ring.complete(prompt, 24, repetition_penalty=1.5, repetition_context_size=20) == (
        penalised)


def test_concurrent_requests_ride_trains_and_keep_their_tokens(qwen3_model: Path) -> None:
    prompts = [prompt_of(4 + 5 * i, seed=i) for i in range(6)]
    lengths = [12 + 3 * i for i in range(6)]  # members leave their trains at different steps
    with InProcessRing(qwen3_model, RINGS["3-shards-multi-round"]) as ring:
        got = ring.complete_many(prompts, lengths)
        for i, (prompt, length) in enumerate(zip(prompts, lengths, strict=True)):
            assert got[i] == reference_tokens(qwen3_model, prompt, length, ignore_eos=True), i
        ring.wait_idle()


def test_a_request_that_ends_frees_the_caches_on_every_shard(ring: InProcessRing) -> None:
    ring.complete(prompt_of(9), 6)
    ring.wait_idle()


def test_a_client_that_stops_reading_frees_the_caches(ring: InProcessRing) -> None:
    async def read_three() -> None:
        source = ring.stream(prompt_of(5), 100_000)
        for _ in range(3):
            await anext(source)
        assert all(n == 1 for n in ring.active())
        await source.aclose()  # what the HTTP layer does when the client goes

    asyncio.run(read_three())
    ring.wait_idle()


def test_shards_free_the_caches_when_the_entry_vanishes(ring: InProcessRing,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dnet.shard.runtime")

    async def vanish() -> None:
        source = ring.stream(prompt_of(5), 100_000)
        for _ in range(3):
            await anext(source)
        ring.network.kill(ENTRY)  # nobody will read this request's tokens again
        # The shards must not run on to max_tokens; the request here is simply abandoned.
        await asyncio.to_thread(wait_for, lambda: not any(ring.active()), 15,
                                "the shards dropped the request")
        await source.aclose()

    asyncio.run(vanish())
    assert "is gone; releasing" in caplog.text  # the tail noticed, not a timeout


def test_a_full_kv_cache_refuses_with_503_and_reserves_nothing(qwen3_model: Path) -> None:
    # The generated model keeps 2 KiB of KV cache per token over its 8 layers.
    with InProcessRing(qwen3_model, RINGS["2-shards"], kv_cap_bytes=100_000) as ring:
        assert len(ring.complete(prompt_of(20), 20)) == 20
        error = asyncio.run(failure_of(ring.stream(prompt_of(20), 200)))
        assert error.status == 503 and "KV cache full" in error.message
        ring.wait_idle()
        assert [r.kv_reserved_bytes for r in ring.runtimes()] == [0, 0]
        assert len(ring.complete(prompt_of(20), 20)) == 20


def test_a_dead_shard_fails_the_request_with_503_in_manual_mode(ring: InProcessRing) -> None:
    async def die() -> RingError:
        source = ring.stream(prompt_of(5), 100_000)
        for _ in range(3):
            await anext(source)
        ring.kill(1)
        return await failure_of(source)

    error = asyncio.run(die())
    assert error.status == 503, error.message
    wait_for(lambda: ring.active() == [0], 15, "the surviving shard dropped the request")


def test_a_request_is_replayed_on_the_next_ring_with_the_same_tokens(
        qwen3_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    prompt = prompt_of(30, seed=7)
    reference = reference_tokens(qwen3_model, prompt, 40, ignore_eos=True)
    assert_diverse(reference)
    with InProcessRing(qwen3_model, RINGS["3-shards-multi-round"], recover=True) as ring:
        async def die_and_replay() -> list[int]:
            got: list[int] = []
            async for token in ring.stream(prompt, 40):
                got.append(token.token)
                if len(got) == 10:
                    ring.kill(2)  # the middle shard: frames to it break
                    await asyncio.to_thread(ring.replan)
            return got

        assert asyncio.run(die_and_replay()) == reference
        assert "replaying it on the re-planned ring" in caplog.text
        assert ring.epoch == 1 and ring.entry.epoch == 1  # the replay ran on the new plan
        ring.wait_idle()


def test_new_requests_wait_while_paused_and_run_after_resume(ring: InProcessRing) -> None:
    ring.entry.pause()

    async def wait_then_run() -> list[int]:
        task = asyncio.create_task(ring.tokens(prompt_of(6), sampling(6, 5)))
        await asyncio.sleep(0.3)
        assert not task.done() and ring.active() == [0, 0]  # held at the entry
        ring.entry.resume(ring.head, ring.epoch)
        return [t.token for t in await task]

    assert len(asyncio.run(wait_then_run())) == 5


def test_a_paused_entry_refuses_after_the_admission_timeout(qwen3_model: Path) -> None:
    timeouts = Timeouts(admission_s=0.3)
    with InProcessRing(qwen3_model, RINGS["1-shard"], timeouts=timeouts) as ring:
        ring.entry.pause()
        error = asyncio.run(failure_of(ring.stream(prompt_of(4), 4)))
        assert error.status == 503 and "re-planning" in error.message


def test_drain_fails_what_is_left_after_its_timeout(ring: InProcessRing) -> None:
    failed: list[int] = []

    async def drained() -> RingError:
        source = ring.stream(prompt_of(5), 100_000)
        await anext(source)
        drainer = threading.Thread(target=lambda: failed.append(ring.entry.drain(0.3)))
        drainer.start()
        error = await failure_of(source)
        await asyncio.to_thread(drainer.join, 10)
        return error

    error = asyncio.run(drained())
    assert failed == [1]
    assert error.status == 503 and "re-planning" in error.message
    ring.wait_idle()


def test_drain_returns_at_once_when_nothing_runs(ring: InProcessRing) -> None:
    assert ring.entry.drain(30.0) == 0


def test_too_many_requests_get_429(qwen3_model: Path) -> None:
    with InProcessRing(qwen3_model, RINGS["1-shard"], max_requests=1) as ring:
        async def two() -> RingError:
            first = ring.stream(prompt_of(5), 100_000)
            await anext(first)
            error = await failure_of(ring.stream(prompt_of(5), 4))
            await first.aclose()
            return error

        assert asyncio.run(two()).status == 429
        ring.wait_idle()


def test_an_idle_cache_is_dropped_after_the_ttl(qwen3_model: Path) -> None:
    with InProcessRing(qwen3_model, RINGS["1-shard"], kv_ttl_s=0.5) as ring:
        # A prompt chunk that opens a cache and never samples; nobody releases it.
        frame = pb.Frame(request_id="idle", next_layer=0, position=0, tokens=[1, 2, 3],
                         epoch=ring.epoch)
        ring.network.call(ring.head, "Forward", frame)
        wait_for(lambda: ring.active() == [1], 10, "the shard holds the request's cache")
        wait_for(lambda: ring.active() == [0], 10, "the idle cache is dropped")
        assert len(ring.complete(prompt_of(5), 3)) == 3


def test_streamed_weights_give_the_same_tokens(qwen3_model: Path) -> None:
    # Shard 0 keeps 2 of its 5 layers resident and streams the rest from disk.
    prompt = prompt_of(20, seed=11)
    reference = reference_tokens(qwen3_model, prompt, 16, ignore_eos=True)
    assert_diverse(reference)
    with InProcessRing(qwen3_model, [[0, 1, 2, 6, 7], [3, 4, 5]], windows=[2, None]) as ring:
        assert ring.runtimes()[0].stage.streaming
        assert ring.complete(prompt, 16) == reference


def test_the_seed_s_manual_routing_closes_the_ring_at_the_head(inprocess_ring) -> None:
    from dnet.shard.router import ManualRouter

    ring = inprocess_ring([[0, 1, 2, 3], [4, 5, 6, 7]], grpc=True, http=True)
    head, second = ring.shard_addresses
    # `-n` names the next shard: frames go there.
    assert ManualRouter(second).address_for(4, head) == second
    # The last shard's `-n` names the API: the ring closes at the head the frame names.
    api = ring.url.removeprefix("http://")
    assert ManualRouter(api).address_for(0, head) == head
