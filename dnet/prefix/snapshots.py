"""Cutting a layer's cache into prefix blocks, and building a cache back from them (MLX).

Per mlx-lm cache type:
- `KVCache` and `RotatingKVCache` (sliding window) are *sliced*: a block holds the keys and
  values its own tokens added, copied out of the request's cache right after the prefill chunk
  that computed them (a view would keep the request's whole buffer alive and defeat in-place
  updates). Restoring concatenates the blocks; a sliding-window layer keeps only what its
  next prefill chunk can see, as `RotatingKVCache._update_concat` does after a chunk.
- `ArraysCache` (linear attention, SSM conv and recurrent state) is *snapshotted*: its arrays
  after the block's chunk. mlx-lm replaces these arrays on every step rather than writing into
  them, so a snapshot keeps references, not copies.
- `CacheList` is handled member by member. Any other type (quantized or chunked KV caches)
  is not cacheable: `layer_kind` says so and the shard keeps no prefix for that model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, CacheList, KVCache, RotatingKVCache


class LayerKind(Enum):
    SLICED = "sliced"  # keys and values per block
    SNAPSHOT = "snapshot"  # whole state at some block ends
    MIXED = "mixed"  # a CacheList with both


@dataclass(frozen=True)
class KVSlice:
    """One block's keys and values in one layer: arrays [batch 1, kv heads, block, head dim]."""

    keys: mx.array
    values: mx.array

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclass(frozen=True)
class Snapshot:
    """A recurrent-state layer's arrays after a block (entries may be None)."""

    arrays: tuple[Any, ...]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays if a is not None)


Part = KVSlice | Snapshot | tuple  # a tuple: one part per CacheList member


def layer_kind(cache: Any) -> LayerKind | None:
    """How a layer's cache is kept in the prefix cache; None when it cannot be."""
    if type(cache) in (KVCache, RotatingKVCache):
        return LayerKind.SLICED
    if isinstance(cache, ArraysCache) and cache.left_padding is None:
        return LayerKind.SNAPSHOT
    if isinstance(cache, CacheList):
        kinds = {layer_kind(member) for member in cache.caches}
        if None in kinds:
            return None
        if kinds == {LayerKind.SLICED}:
            return LayerKind.SLICED
        return LayerKind.SNAPSHOT if kinds == {LayerKind.SNAPSHOT} else LayerKind.MIXED
    return None


def chunk_slice(cache: Any, length: int) -> Part:
    """The keys and values the last prefill chunk of `length` tokens added (copies), or for a
    state layer None (snapshots are taken with `snapshot`). Call right after the chunk."""
    if isinstance(cache, CacheList):
        return tuple(chunk_slice(member, length) for member in cache.caches)
    if isinstance(cache, ArraysCache):
        return Snapshot(())
    # RotatingKVCache._update_concat leaves the chunk last, in temporal order.
    end = cache.keys.shape[2] if type(cache) is RotatingKVCache else cache.offset
    keys = mx.contiguous(cache.keys[..., end - length:end, :])
    values = mx.contiguous(cache.values[..., end - length:end, :])
    return KVSlice(keys, values)


def snapshot(cache: Any) -> Part:
    """A state layer's arrays now (references: mlx-lm never writes into them)."""
    if isinstance(cache, CacheList):
        return tuple(snapshot(member) for member in cache.caches)
    if isinstance(cache, ArraysCache):
        return Snapshot(tuple(cache.cache))
    return Snapshot(())


def part_nbytes(part: Part) -> int:
    if isinstance(part, tuple):
        return sum(part_nbytes(p) for p in part)
    return part.nbytes


def restore(template: Any, slices: Sequence[Part], state: Part | None, length: int) -> Any:
    """A fresh cache like `template` holding the first `length` tokens: `slices` are the
    blocks' parts for this layer, in order; `state` the snapshot at the last one (state layers).
    Raises ValueError when a needed part is missing."""
    if isinstance(template, CacheList):
        members = [
            restore(member, [s[i] for s in slices], None if state is None else state[i], length)
            for i, member in enumerate(template.caches)
        ]
        return CacheList(*members)
    if isinstance(template, ArraysCache):
        if not isinstance(state, Snapshot) or not state.arrays:
            raise ValueError("a state layer needs a snapshot to restore a prefix")
        cache = copy.copy(template)
        cache.cache = list(state.arrays)
        return cache
    keys = mx.concatenate([s.keys for s in slices], axis=2)
    values = mx.concatenate([s.values for s in slices], axis=2)
    if type(template) is RotatingKVCache:
        # What a chunk boundary leaves: the `keep` first tokens and the last max_size - 1,
        # which is all the next chunk's queries can attend to.
        window = template.max_size - 1
        if keys.shape[2] > template.keep + window:
            keys = mx.concatenate([keys[..., :template.keep, :], keys[..., -window:, :]], axis=2)
            values = mx.concatenate([values[..., :template.keep, :],
                                     values[..., -window:, :]], axis=2)
        cache = RotatingKVCache(template.max_size, template.keep)
        cache.keys, cache.values, cache.offset = keys, values, length
        cache._idx = keys.shape[2]
        return cache
    cache = KVCache()
    cache.keys, cache.values, cache.offset = keys, values, length
    return cache
