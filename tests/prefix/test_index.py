"""The prefix index: block keys, reuse depth, pins and least-recently-used eviction by bytes."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnet.prefix.index import (
    ROOT,
    PrefixIndex,
    admit,
    block_keys,
    pin,
    prefill_chunks,
    resize,
    unpin,
    usable_depth,
)


def test_prefill_chunks_are_mlx_lm_steps_aligned_at_zero() -> None:
    assert prefill_chunks(1, 4) == []
    assert prefill_chunks(5, 4) == [(0, 4)]
    assert prefill_chunks(6, 4) == [(0, 4), (4, 5)]
    assert prefill_chunks(10, 4, start=4) == [(4, 8), (8, 9)]
    assert prefill_chunks(4, 4, start=4) == []
    with pytest.raises(ValueError):
        prefill_chunks(10, 4, start=3)


def test_block_keys_name_whole_prefixes() -> None:
    a = block_keys(list(range(20)), 4)
    assert len(a) == 4  # 19 prefill tokens: 4 full chunks
    b = block_keys(list(range(16)) + [99, 98, 97, 96, 95], 4)
    assert b[:3] == a[:3] and len(b) == 5 and b[3] == a[3]
    c = block_keys([7] + list(range(1, 20)), 4)
    assert not set(c) & set(a)  # one token differs early: every later key differs
    assert block_keys(list(range(20)), 4, namespace=b"other") != a
    assert block_keys(list(range(20)), 5)[0] != a[0]
    assert block_keys([1, 2, 3, 4], 4) == []  # the last token is never in a block


def _chain(index: PrefixIndex, keys: list[bytes], size: int, now: float,
           state_at: int | None = None) -> PrefixIndex:
    parent = ROOT
    for i, key in enumerate(keys):
        result = admit(index, key, parent, size, now + i,
                       state_bytes=size if state_at == i else 0)
        assert result.admitted
        index, parent = result.index, key
    return index


def test_reuse_depth_and_snapshots() -> None:
    keys = block_keys(list(range(41)), 4)  # 10 blocks
    index = _chain(PrefixIndex(10_000), keys[:6], 100, 0.0)
    assert usable_depth(index, keys) == 6
    assert usable_depth(index, keys[:3]) == 3
    assert usable_depth(index, block_keys([5] * 41, 4)) == 0
    stateful = _chain(PrefixIndex(10_000, needs_state=True), keys[:6], 100, 0.0, state_at=3)
    assert usable_depth(stateful, keys) == 4  # the deepest block with a snapshot


def test_lru_eviction_takes_leaves_and_keeps_pins() -> None:
    shared = block_keys(list(range(17)), 4)  # 4 blocks: a shared system prompt
    one = block_keys(list(range(16)) + [100 + i for i in range(9)], 4)  # + 2 of its own
    two = block_keys(list(range(16)) + [200 + i for i in range(9)], 4)
    assert one[:4] == shared and two[:4] == shared
    index = _chain(PrefixIndex(600), one, 100, 0.0)  # 6 blocks, full
    assert index.nbytes == 600
    index = pin(index, "req-1", one[:5], now=10.0)
    # Conversation two needs 2 blocks: the unpinned leaf one[5] goes; then no room is left
    # (one[4] is pinned, the shared blocks are not leaves).
    first = admit(index, two[4], two[3], 100, 11.0)
    assert first.admitted and first.evicted_blocks == (one[5],)
    second = admit(first.index, two[5], two[4], 100, 12.0)
    assert not second.admitted and second.index == first.index
    freed = unpin(first.index, "req-1")
    third = admit(freed, two[5], two[4], 100, 13.0)
    assert third.admitted and third.evicted_blocks == (one[4],)
    assert usable_depth(third.index, two) == 6 and usable_depth(third.index, one) == 4


def test_a_block_without_its_parent_is_refused() -> None:
    keys = block_keys(list(range(13)), 4)
    result = admit(PrefixIndex(1000), keys[1], keys[0], 10, 0.0)
    assert not result.admitted and not result.index.blocks


def test_an_existing_block_gains_a_snapshot_and_is_touched() -> None:
    keys = block_keys(list(range(9)), 4)
    index = _chain(PrefixIndex(1000, needs_state=True), keys, 100, 0.0)
    assert usable_depth(index, keys) == 0
    result = admit(index, keys[1], keys[0], 100, 50.0, state_bytes=40)
    assert result.admitted and result.index.nbytes == 240
    assert result.index.blocks[keys[1]].last_used == 50.0
    assert usable_depth(result.index, keys) == 2


def test_snapshots_go_before_blocks_when_older() -> None:
    keys = block_keys(list(range(13)), 4)  # 3 blocks
    index = _chain(PrefixIndex(400, needs_state=True), keys[:2], 100, 0.0, state_at=0)
    assert index.nbytes == 300  # block 0 with its snapshot, block 1
    # 100 bytes over: the oldest entry is block 0's snapshot (block 0 itself is not a leaf).
    result = admit(index, keys[2], keys[1], 100, 5.0, state_bytes=100)
    assert result.admitted and result.evicted_states == (keys[0],)
    assert result.evicted_blocks == () and not result.index.blocks[keys[0]].state
    assert usable_depth(result.index, keys) == 3
    # Offering a block that is cached with its snapshot only marks it used.
    full = admit(result.index, keys[2], keys[1], 100, 6.0, state_bytes=300)
    assert full.admitted and full.index == replace(result.index, blocks={
        **result.index.blocks, keys[2]: replace(result.index.blocks[keys[2]], last_used=6.0)})


def test_resize_evicts_down_to_the_new_capacity() -> None:
    keys = block_keys(list(range(41)), 4)
    index = _chain(PrefixIndex(1000), keys, 100, 0.0)
    result = resize(index, 350)
    assert result.index.nbytes == 300
    assert result.evicted_blocks == (keys[9], keys[8], keys[7], keys[6], keys[5], keys[4],
                                     keys[3])
    assert resize(result.index, 0).index.blocks == {}


@st.composite
def _operations(draw):
    # Conversations over a small alphabet share prefixes often.
    return draw(st.lists(st.tuples(
        st.sampled_from(["admit", "pin", "unpin", "resize"]),
        st.lists(st.integers(0, 2), min_size=5, max_size=21),
        st.integers(1, 300), st.booleans()), max_size=40))


@settings(max_examples=300, deadline=None)
@given(_operations(), st.booleans())
def test_invariants_hold_under_any_operations(operations, needs_state) -> None:
    index = PrefixIndex(1000, needs_state=needs_state)
    now = 0.0
    for op, tokens, size, flag in operations:
        now += 1.0
        keys = block_keys(tokens, 4)
        if op == "admit" and keys:
            depth = max(1, usable_depth(replace(index, needs_state=False), keys) + 1)
            depth = min(depth, len(keys))
            parent = keys[depth - 2] if depth > 1 else ROOT
            before_pinned = {k: index.blocks[k] for k in index.pinned() if k in index.blocks}
            result = admit(index, keys[depth - 1], parent, size, now,
                           state_bytes=size // 2 if flag else 0)
            assert set(before_pinned) <= set(result.index.blocks)  # pins survive
            if result.admitted:
                assert keys[depth - 1] in result.index.blocks
            index = result.index
        elif op == "pin":
            depth = usable_depth(replace(index, needs_state=False), keys)
            index = pin(index, f"r{len(tokens) % 3}", keys[:depth], now)
        elif op == "unpin":
            index = unpin(index, f"r{len(tokens) % 3}")
        elif op == "resize":
            index = resize(index, size * 4).index
        # Every block's parent is cached, children counts are exact, the capacity holds
        # unless pins alone exceed it.
        for key, block in index.blocks.items():
            assert block.parent == ROOT or block.parent in index.blocks
            assert block.children == sum(1 for b in index.blocks.values() if b.parent == key)
        pinned_bytes = sum(index.blocks[k].nbytes + index.blocks[k].state_bytes
                           for k in index.pinned() if k in index.blocks)
        assert index.nbytes <= max(index.capacity_bytes, pinned_bytes + 300 + 150)
