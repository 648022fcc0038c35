"""A shard's prefix store: lookups pin, openings restore, blocks are admitted once every held
layer has its part, the capacity holds, lapsed pins go, and caches it cannot cut keep nothing.

mlx-lm cache objects filled with known arrays stand in for a model's layers: what is checked
is the bookkeeping and the arrays that come back (the numbers of a restored prefix are
checked against a real model in test_snapshots.py and test_ring_prefix.py).
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache

from dnet.prefix.budget import DEFAULT_SHARE, default_capacity
from dnet.prefix.index import ROOT, block_keys
from dnet.prefix.store import BLOCK_OVERHEAD_BYTES, PrefixMiss, PrefixStore

BLOCK = 4
HEADS, DIM = 2, 8
BLOCK_BYTES = 2 * HEADS * BLOCK * DIM * 4 + BLOCK_OVERHEAD_BYTES  # keys + values, float32


def filled(caches: dict[int, KVCache], start: int, length: int) -> None:
    """A prefill chunk of `length` tokens through every layer: values name layer and position."""
    for layer, cache in caches.items():
        positions = mx.arange(start, start + length, dtype=mx.float32)
        keys = mx.broadcast_to((layer * 1000 + positions)[None, None, :, None],
                               (1, HEADS, length, DIM))
        cache.update_and_fetch(keys, -keys)


def prefill(store: PrefixStore, owner: str, keys: list[bytes], layers: list[range],
            now: float = 0.0) -> dict[int, KVCache]:
    """Fill fresh caches block by block, cutting each block run by run as a shard would."""
    caches = {layer: KVCache() for run in layers for layer in run}
    for k, key in enumerate(keys):
        parent = keys[k - 1] if k else ROOT
        for run in layers:
            filled({layer: caches[layer] for layer in run}, k * BLOCK, BLOCK)
            if store.wants(owner, key, parent, False):
                cut = store.cut(caches, run, BLOCK, False)
                mx.eval(cut.arrays())
                store.offer(owner, key, parent, cut, now)
    return caches


def test_a_block_is_admitted_once_every_run_of_layers_has_cut_it() -> None:
    keys = block_keys(list(range(13)), BLOCK)  # 3 blocks
    store = PrefixStore(1 << 20, {0: KVCache(), 1: KVCache(), 6: KVCache()})
    caches = {layer: KVCache() for layer in (0, 1, 6)}
    filled({0: caches[0], 1: caches[1]}, 0, BLOCK)
    assert store.wants("r", keys[0], ROOT, False)
    store.offer("r", keys[0], ROOT, store.cut(caches, range(0, 2), BLOCK, False), 1.0)
    assert store.stats.blocks == 0  # layer 6 (the second round) has not run the chunk yet
    # The next chunk's first round comes before the first chunk's second: its parent is
    # being cut, so it is cut too.
    filled({0: caches[0], 1: caches[1]}, BLOCK, BLOCK)
    assert store.wants("r", keys[1], keys[0], False)
    store.offer("r", keys[1], keys[0], store.cut(caches, range(0, 2), BLOCK, False), 1.0)
    filled({6: caches[6]}, 0, BLOCK)
    store.offer("r", keys[0], ROOT, store.cut(caches, range(6, 7), BLOCK, False), 1.0)
    filled({6: caches[6]}, BLOCK, BLOCK)
    store.offer("r", keys[1], keys[0], store.cut(caches, range(6, 7), BLOCK, False), 1.0)
    assert store.stats.blocks == 2 and store.stats.nbytes == 2 * (3 * BLOCK_BYTES
                                                                  - 2 * BLOCK_OVERHEAD_BYTES)
    assert not store.wants("s", keys[0], ROOT, False)  # cached: another request skips it


def test_a_lookup_pins_what_every_shard_so_far_can_restore_and_the_opening_restores_it() -> None:
    keys = block_keys(list(range(17)), BLOCK)  # 4 blocks
    store = PrefixStore(1 << 20, {0: KVCache(), 1: KVCache()})
    original = prefill(store, "first", keys[:3], [range(0, 2)])
    assert store.look_up("second", keys, 4, now=1.0, ttl_s=30.0) == 3
    assert store.look_up("third", keys, 2, now=1.0, ttl_s=30.0) == 2  # an earlier shard: 2
    stats = store.stats
    assert (stats.lookups, stats.looked_up_blocks, stats.hit_blocks) == (2, 8, 6)
    assert stats.hit_rate == pytest.approx(0.75)
    restored = store.restore("second", 3, 3 * BLOCK, {0: KVCache(), 1: KVCache()})
    for layer in (0, 1):
        assert restored[layer].offset == 3 * BLOCK
        assert mx.array_equal(restored[layer].keys, original[layer].keys[..., :3 * BLOCK, :])
        assert mx.array_equal(restored[layer].values,
                              original[layer].values[..., :3 * BLOCK, :])
    assert store.stats.restored_blocks == 3
    with pytest.raises(PrefixMiss):  # the pin went with the restore
        store.restore("second", 3, 3 * BLOCK, {0: KVCache(), 1: KVCache()})
    with pytest.raises(PrefixMiss):  # more than was pinned
        store.restore("third", 3, 3 * BLOCK, {0: KVCache(), 1: KVCache()})


def test_pinned_blocks_survive_eviction_and_unpinned_ones_go_least_recent_first() -> None:
    store = PrefixStore(2 * BLOCK_BYTES, {0: KVCache()})
    one = block_keys(list(range(9)), BLOCK)  # 2 blocks: the store is full
    prefill(store, "a", one, [range(0, 1)], now=1.0)
    assert store.look_up("pinned", one, 2, now=2.0, ttl_s=30.0) == 2
    two = block_keys([100 + i for i in range(9)], BLOCK)
    prefill(store, "b", two, [range(0, 1)], now=3.0)
    assert store.stats.blocks == 2  # nothing could be evicted: both blocks are pinned
    store.forget("pinned")
    prefill(store, "b", two, [range(0, 1)], now=4.0)
    assert store.look_up("c", two, 2, now=5.0, ttl_s=30.0) == 2
    assert store.look_up("d", one, 2, now=5.0, ttl_s=30.0) == 0
    assert store.stats.nbytes <= 2 * BLOCK_BYTES


def test_resizing_evicts_down_to_the_new_capacity_and_zero_turns_the_cache_off() -> None:
    store = PrefixStore(1 << 20, {0: KVCache()})
    keys = block_keys(list(range(17)), BLOCK)
    prefill(store, "a", keys, [range(0, 1)])
    assert store.stats.blocks == 4
    store.resize(2 * BLOCK_BYTES)
    assert store.stats.blocks == 2 and store.stats.capacity_bytes == 2 * BLOCK_BYTES
    assert store.look_up("b", keys, 4, now=1.0, ttl_s=1.0) == 2  # the oldest leaves stayed
    store.resize(0)
    assert not store.enabled and store.stats.blocks == 2  # pinned by "b": they stay for it
    store.forget("b")  # its request opened: what it kept above the capacity goes
    assert store.stats.blocks == 0
    assert store.look_up("c", keys, 4, now=1.0, ttl_s=1.0) == 0
    assert not store.wants("c", keys[0], ROOT, False)


def test_a_pin_whose_request_never_comes_lapses() -> None:
    store = PrefixStore(1 << 20, {0: KVCache()})
    keys = block_keys(list(range(9)), BLOCK)
    prefill(store, "a", keys, [range(0, 1)])
    store.look_up("gone", keys, 2, now=10.0, ttl_s=5.0)
    assert store.next_expiry() == 15.0
    assert store.expire(14.9) == [] and store.index.pinned()
    assert store.expire(15.0) == ["gone"]
    assert not store.index.pinned() and store.next_expiry() is None


def test_state_layers_restore_only_where_a_snapshot_was_kept() -> None:
    store = PrefixStore(1 << 20, {0: KVCache(), 1: ArraysCache(2)})
    keys = block_keys(list(range(13)), BLOCK)  # 3 blocks
    caches = {0: KVCache(), 1: ArraysCache(2)}
    for k, key in enumerate(keys):
        filled({0: caches[0]}, k * BLOCK, BLOCK)
        caches[1].cache = [mx.full((1, 3), float(k)), mx.full((1, 2), -float(k))]
        snapshot_here = k == 1
        assert store.wants("r", key, keys[k - 1] if k else ROOT, snapshot_here)
        cut = store.cut(caches, range(0, 2), BLOCK, snapshot_here)
        mx.eval(cut.arrays())
        store.offer("r", key, keys[k - 1] if k else ROOT, cut, 0.0)
    assert store.look_up("s", keys, 3, now=0.0, ttl_s=1.0) == 2  # the snapshot at block 2
    restored = store.restore("s", 2, 2 * BLOCK, {0: KVCache(), 1: ArraysCache(2)})
    assert mx.array_equal(restored[1].cache[0], mx.full((1, 3), 1.0))
    assert restored[0].offset == 2 * BLOCK
    # A later request asking for a snapshot at a cached block without one adds it.
    assert store.wants("t", keys[2], keys[1], True)
    assert not store.wants("t", keys[1], keys[0], True)


def test_caches_that_cannot_be_cut_keep_no_prefix() -> None:
    store = PrefixStore(1 << 20, {0: KVCache(), 1: QuantizedKVCache()})
    assert not store.cacheable and not store.enabled
    keys = block_keys(list(range(9)), BLOCK)
    assert not store.wants("r", keys[0], ROOT, False)
    assert store.look_up("r", keys, 2, now=0.0, ttl_s=1.0) == 0


def test_the_default_size_is_what_the_plan_leaves_up_to_a_share_of_the_budget() -> None:
    budget = 64 * DEFAULT_SHARE
    assert default_capacity(budget, 0) == 64
    assert default_capacity(budget, budget - 10) == 10  # only what the plan leaves
    assert default_capacity(budget, budget + 10) == 0
