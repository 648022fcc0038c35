"""When the prefix cache cannot do its part, the request fails fast with a retryable 503 or
runs without it; it never computes wrong, never hangs, and never pins blocks for good."""

from __future__ import annotations

import asyncio
import time

from dnet.prefix.index import block_keys, namespace_for
from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring import frames
from dnet.ring.frames import Lookup
from dnet.shard.router import MeshRouter
from tests.inprocess import failure_of, wait_for
from tests.prefix.test_ring_prefix import BLOCK, TWO, run, start, words


def test_an_opening_whose_prefix_was_not_pinned_fails_with_a_retryable_503(
        inprocess_ring, monkeypatch) -> None:
    ring = start(inprocess_ring, TWO)
    prompt = words(50, seed=1)
    run(ring, prompt, 2)

    async def no_lookup(*_args) -> int:
        return 2  # claim two blocks without pinning them anywhere

    monkeypatch.setattr(ring.entry, "_look_up", no_lookup)
    error = asyncio.run(failure_of(ring.stream(prompt, 4)))
    assert error.status == 503 and "prefix blocks" in error.message
    ring.wait_idle()
    assert all(r.kv_reserved_bytes == 0 for r in ring.runtimes())


def test_a_lookup_a_later_shard_rejects_fails_the_request_at_once(inprocess_ring) -> None:
    ring = start(inprocess_ring, TWO)
    second = ring.live()[1].runtime
    # The second shard moves to another plan epoch alone: it rejects the lookup.
    second.retarget(MeshRouter({}), ring.epoch + 1)
    began = time.monotonic()
    error = asyncio.run(failure_of(ring.stream(words(50, seed=2), 4)))
    assert error.status == 503 and "rejected" in error.message
    assert time.monotonic() - began < 30  # not the first-token timeout (60 s here)
    wait_for(lambda: ring.runtimes()[0].prefix_stats.pinned_requests == 0, 15,
             "the head unpinned the failed lookup")


def test_a_lookup_whose_request_never_comes_unpins_after_the_ttl(inprocess_ring) -> None:
    ring = start(inprocess_ring, TWO, kv_ttl_s=0.5)
    prompt = words(50, seed=3)
    run(ring, prompt, 2)
    keys = tuple(block_keys(prompt, BLOCK, namespace_for(BLOCK)))
    head = ring.live()[0]
    head.runtime.accept(frames.to_wire(Lookup("orphan", 0, keys, len(keys), "nowhere:1",
                                              head.address, ring.epoch)))
    wait_for(lambda: all(r.prefix_stats.pinned_requests == 1 for r in ring.runtimes()), 15,
             "every shard pinned the orphan's prefix")
    wait_for(lambda: all(r.prefix_stats.pinned_requests == 0 for r in ring.runtimes()), 15,
             "the pins lapsed")
    assert run(ring, prompt, 2)[1] == 3 * BLOCK  # the blocks themselves stay cached


def test_lookups_cost_nothing_when_no_prompt_has_a_full_block(inprocess_ring) -> None:
    ring = start(inprocess_ring, TWO)
    tokens = asyncio.run(ring.tokens(words(BLOCK, seed=4), pb.SamplingParams(
        max_tokens=3, max_context=BLOCK + 3)))
    assert len(tokens) == 3 and tokens[0].cached_tokens == 0
    assert [r.prefix_stats.lookups for r in ring.runtimes()] == [0, 0]
    ring.wait_idle()
