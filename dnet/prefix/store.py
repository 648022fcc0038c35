"""One shard's prefix cache: the blocks it keeps for its layers, on the compute thread (MLX).

What is kept is decided by the pure index (`dnet.prefix.index`): a block is the KV state one
full prefill chunk left in every layer this shard holds, named by its chain key, and admitted
or evicted as a whole (LRU by bytes, within `capacity_bytes`). Here live the arrays: one
`Part` per held layer and block (`dnet.prefix.snapshots`), and for recurrent-state layers a
snapshot at the blocks that ask for one.

The request path uses it three times:
- `look_up` (a LOOKUP frame): how many of a prompt's leading blocks this shard can restore,
  pinning them for the request until it opens, is released, or the pin expires;
- `restore` (the request's opening): fresh caches holding the pinned prefix; the pin goes;
- `cut` and `offer` (after a full prefill chunk ran through a run of layers): copy that
  chunk's part of each layer; once every held layer has its part (a multi-round shard sees a
  chunk once per run) the block is offered to the index.

A shard keeps no prefix at all (every lookup answers 0) when its cache is off (capacity 0) or
a layer's cache type cannot be cut into blocks (quantized or chunked caches).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import mlx.core as mx

from dnet.prefix.index import ROOT, PrefixIndex, admit, pin, resize, unpin, usable_depth
from dnet.prefix.snapshots import (
    LayerKind,
    Part,
    chunk_slice,
    layer_kind,
    part_nbytes,
    restore,
    snapshot,
)

BLOCK_OVERHEAD_BYTES = 256  # the index entry and key of a block, counted against the capacity


class PrefixMiss(RuntimeError):
    """An opening asks for more blocks than this shard pinned for it (a pin that expired, or
    an opening without its lookup): the request cannot start here without computing wrong."""


@dataclass(frozen=True)
class PrefixStats:
    """What a shard's prefix cache holds and how often it serves (counts since it started)."""

    nbytes: int
    capacity_bytes: int
    blocks: int
    pinned_requests: int = 0  # looked up, not yet opened (or lapsed)
    lookups: int = 0
    looked_up_blocks: int = 0  # the prompt blocks lookups asked for
    hit_blocks: int = 0  # of those, how many this shard could restore
    restored_blocks: int = 0  # blocks requests actually started from (every shard agreeing)

    @property
    def hit_rate(self) -> float | None:
        """hit_blocks / looked_up_blocks; None before the first lookup."""
        return self.hit_blocks / self.looked_up_blocks if self.looked_up_blocks else None


@dataclass
class Cut:
    """One chunk's parts for a run of layers, copied out of a request's caches (lazy until
    evaluated with `arrays`)."""

    parts: dict[int, Part]
    states: dict[int, Part]

    def arrays(self) -> list[mx.array]:
        out: list[mx.array] = []
        for part in (*self.parts.values(), *self.states.values()):
            _collect(part, out)
        return out


@dataclass
class _Pending:
    parts: dict[int, Part] = field(default_factory=dict)
    states: dict[int, Part] = field(default_factory=dict)


class PrefixStore:
    """The prefix cache of a shard whose layers' fresh caches are `templates` (layer ->
    mlx-lm cache object, as `Stage.new_caches` makes them)."""

    def __init__(self, capacity_bytes: int, templates: Mapping[int, Any]) -> None:
        self._kinds = {layer: layer_kind(cache) for layer, cache in templates.items()}
        # Whether this shard's layers can keep a prefix at all.
        self.cacheable = bool(templates) and None not in self._kinds.values()
        self._state_layers = frozenset(layer for layer, kind in self._kinds.items()
                                       if kind is not LayerKind.SLICED)
        self._index = PrefixIndex(capacity_bytes if self.cacheable else 0,
                                  needs_state=bool(self._state_layers))
        self._parts: dict[bytes, dict[int, Part]] = {}  # block key -> layer -> KV part
        self._states: dict[bytes, dict[int, Part]] = {}  # block key -> layer -> snapshot
        self._pending: dict[tuple[str, bytes], _Pending] = {}  # (request, block) -> so far
        self._expiry: dict[str, float] = {}  # request -> when its pin lapses
        self._stats = PrefixStats(0, self._index.capacity_bytes, 0)

    @property
    def enabled(self) -> bool:
        return self.cacheable and self._index.capacity_bytes > 0

    def resize(self, capacity_bytes: int) -> None:
        """Hold at most `capacity_bytes` from now on: evicts least recently used blocks down to
        it (pinned ones stay until their requests open)."""
        result = resize(self._index, capacity_bytes if self.cacheable else 0)
        self._index = result.index
        self._drop(result.evicted_blocks, result.evicted_states)

    # ----- lookups and openings -----------------------------------------------------------

    def look_up(self, owner: str, keys: Sequence[bytes], depth: int, now: float,
                ttl_s: float) -> int:
        """How many leading blocks of `keys` the request `owner` may start from: the least of
        `depth` (what earlier shards can do) and what this shard holds. Those blocks are
        pinned for `owner` until `restore`, `forget`, or `ttl_s` seconds pass."""
        own = usable_depth(self._index, keys) if self.enabled else 0
        reused = min(depth, own)
        self._index = pin(self._index, owner, keys[:reused], now)
        self._expiry[owner] = now + ttl_s
        stats = self._stats
        self._stats = replace(stats, lookups=stats.lookups + 1,
                              looked_up_blocks=stats.looked_up_blocks + len(keys),
                              hit_blocks=stats.hit_blocks + own)
        return reused

    def restore(self, owner: str, blocks: int, length: int,
                caches: dict[int, Any]) -> dict[int, Any]:
        """`caches` (fresh, per held layer) holding the first `blocks` blocks pinned for
        `owner`, `length` tokens in all; unpins them. Raises PrefixMiss when fewer blocks are
        pinned."""
        chain = self._index.pins.get(owner, ())[:blocks]
        self.forget(owner)
        if len(chain) < blocks:
            raise PrefixMiss(f"this shard holds {len(chain)} of the {blocks} prefix blocks the "
                             "request opens with; please retry")
        last = self._states.get(chain[-1], {})
        restored = {layer: restore(template, [self._parts[key][layer] for key in chain],
                                   last.get(layer), length)
                    for layer, template in caches.items()}
        self._stats = replace(self._stats, restored_blocks=self._stats.restored_blocks + blocks)
        return restored

    def forget(self, owner: str) -> None:
        """The request ended or opened: drop its pin and any block it was still cutting (and
        what its pin kept above a capacity lowered meanwhile)."""
        pinned = owner in self._index.pins
        self._index = unpin(self._index, owner)
        self._expiry.pop(owner, None)
        for pending in [p for p in self._pending if p[0] == owner]:
            del self._pending[pending]
        if pinned and self._index.nbytes > self._index.capacity_bytes:
            self.resize(self._index.capacity_bytes)

    def forget_all(self) -> None:
        for owner in list(self._expiry):
            self.forget(owner)
        self._pending.clear()

    def expire(self, now: float) -> list[str]:
        """Unpin the lookups whose request never came in time; their request ids."""
        lapsed = [owner for owner, deadline in self._expiry.items() if now >= deadline]
        for owner in lapsed:
            self.forget(owner)
        return lapsed

    def next_expiry(self) -> float | None:
        return min(self._expiry.values(), default=None)

    # ----- inserting blocks -----------------------------------------------------------------

    def wants(self, owner: str, key: bytes, parent: bytes, snapshot_here: bool) -> bool:
        """Whether request `owner`'s chunk that leaves block `key` (after `parent`) is worth
        cutting: not when the block is cached already (with its snapshot, if one is asked
        for) or its parent is neither cached nor being cut (it could never be reached). A
        block this request has started cutting on another run of layers is finished."""
        if not self.enabled:
            return False
        if (owner, key) in self._pending:
            return True
        block = self._index.blocks.get(key)
        if block is not None:
            return snapshot_here and bool(self._state_layers) and not block.state
        return parent == ROOT or parent in self._index.blocks or (owner, parent) in self._pending

    def cut(self, caches: Mapping[int, Any], layers: range, length: int,
            snapshot_here: bool) -> Cut:
        """The parts the last prefill chunk of `length` tokens left in `layers` (those with a
        cache), and snapshots of their state layers when `snapshot_here`. Evaluate
        `Cut.arrays()` before the caches change again."""
        held = [layer for layer in layers if layer in caches]
        return Cut({layer: chunk_slice(caches[layer], length) for layer in held},
                   {layer: snapshot(caches[layer]) for layer in held
                    if snapshot_here and layer in self._state_layers})

    def offer(self, owner: str, key: bytes, parent: bytes, cut: Cut, now: float) -> None:
        """Add `cut` to the block `key`; once every held layer has its part, offer the block
        to the index (which may refuse it: too big, parent evicted meanwhile)."""
        pending = self._pending.setdefault((owner, key), _Pending())
        pending.parts.update(cut.parts)
        pending.states.update(cut.states)
        if set(pending.parts) != set(self._kinds):
            return
        del self._pending[(owner, key)]
        states = pending.states if set(pending.states) == self._state_layers else {}
        nbytes = BLOCK_OVERHEAD_BYTES + sum(part_nbytes(p) for p in pending.parts.values())
        state_bytes = sum(part_nbytes(p) for p in states.values())
        result = admit(self._index, key, parent, nbytes, now, state_bytes=state_bytes)
        if not result.admitted:
            return
        self._index = result.index
        self._parts.setdefault(key, pending.parts)
        if states and key not in self._states:
            self._states[key] = states
        self._drop(result.evicted_blocks, result.evicted_states)

    def _drop(self, blocks: Sequence[bytes], states: Sequence[bytes]) -> None:
        """Let go of the arrays of evicted blocks and snapshots."""
        for gone in blocks:
            self._parts.pop(gone, None)
            self._states.pop(gone, None)
        for gone in states:
            self._states.pop(gone, None)

    # ----- reporting ------------------------------------------------------------------------

    @property
    def stats(self) -> PrefixStats:
        """Counts so far, with the index's size now (safe to read from any thread: the index
        is replaced, never changed)."""
        index = self._index
        return replace(self._stats, nbytes=index.nbytes, capacity_bytes=index.capacity_bytes,
                       blocks=len(index.blocks), pinned_requests=len(index.pins))

    @property
    def index(self) -> PrefixIndex:
        return self._index


def _collect(part: Part, out: list[mx.array]) -> None:
    if isinstance(part, tuple):
        for member in part:
            _collect(member, out)
        return
    arrays = (part.keys, part.values) if hasattr(part, "keys") else part.arrays
    out.extend(a for a in arrays if a is not None)
