"""The prefix cache's bookkeeping: which prompt blocks a shard keeps, how much of a new prompt
it can reuse, and what to evict. Pure: functions return a new index and never mutate their
input; time comes in as `now`; no MLX, no clock, no threads.

A prompt's prefill runs in chunks of `block_size` tokens aligned at position 0, all but its last
token (see `prefill_chunks`). The KV state one full chunk leaves in each layer is a *block*. A
block is named by a key that hashes its tokens together with its parent's key, so two prompts
share a block exactly when they share every token up to its end: the block hash of vLLM's
automatic prefix caching (docs.vllm.ai, "Automatic Prefix Caching"). A block holds the keys and
values of its own tokens only, so a prefix that several conversations share is stored once.

Why only full prefill chunks: a cached prefix must not change the numbers. Without a cache, a
prompt's chunk [k*B, (k+1)*B) is computed as one matmul of B rows after exactly the same
history; with reuse up to a multiple of B, the chunks that follow are the same chunks, so each
row is computed by the same kernels on the same inputs. Tokens computed otherwise (the partial
last chunk, the last prompt token, decode steps) would feed other kernel shapes (on Metal,
matrix-vector rather than matrix-matrix products), so they are never cached.

Recurrent-state layers (linear attention, SSMs: mlx-lm's `ArraysCache`) cannot be sliced; their
whole state after a block is a *snapshot*, kept only at some blocks (`Block.state`). A prefix is
usable to a depth where every block is present and, if the model has such layers, the last one
has a snapshot.

Eviction is least-recently-used by bytes, among what no request has pinned: a snapshot alone, or
a leaf block (one without children: evicting an inner block would strand its descendants).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

BLOCK_KEY_BYTES = 16
ROOT = b""  # the parent of a prompt's first block


def prefill_chunks(prompt_len: int, block_size: int, start: int = 0) -> list[tuple[int, int]]:
    """The prefill chunks (start, end) of a prompt of `prompt_len` tokens, from `start` on.

    All but the last prompt token are prefilled in chunks of `block_size` aligned at 0, as
    mlx-lm's `generate_step` does with `prefill_step_size`; the last token runs alone and is
    sampled. `start` must be a multiple of `block_size` (a reused prefix). Raises ValueError
    otherwise.
    """
    if block_size < 1 or start % block_size or start < 0:
        raise ValueError(f"start {start} is not a multiple of the block size {block_size}")
    end = max(prompt_len - 1, start)
    return [(i, min(i + block_size, end)) for i in range(start, end, block_size)]


def namespace_for(block_size: int) -> bytes:
    """What block keys are salted with: the chunk size, so prompts cut differently never share
    a block. (A shard's cache belongs to one model and one set of layers: a new model or a new
    assignment is a new runtime with an empty cache, so the model needs no place here.)"""
    return f"dnet-prefix/{block_size}".encode()


def block_keys(tokens: Sequence[int], block_size: int, namespace: bytes = b"") -> list[bytes]:
    """Keys of the full blocks a prompt's prefill leaves: one per full chunk of its first
    `len(tokens) - 1` tokens. Key i = BLAKE2b-128(key i-1 || namespace || tokens of block i as
    int32), with key -1 the empty string; `namespace` separates models and chunkings."""
    keys: list[bytes] = []
    parent = ROOT
    for start, end in prefill_chunks(len(tokens), block_size):
        if end - start < block_size:
            break
        digest = hashlib.blake2b(parent + namespace, digest_size=BLOCK_KEY_BYTES)
        digest.update(array("i", tokens[start:end]).tobytes())
        parent = digest.digest()
        keys.append(parent)
    return keys


@dataclass(frozen=True)
class Block:
    """One cached block. Sizes in bytes; `last_used` is monotonic seconds."""

    parent: bytes
    nbytes: int  # keys and values of the block's own tokens, every sliceable layer
    last_used: float
    state_bytes: int = 0  # the recurrent-state snapshot at its end (0: none kept)
    children: int = 0

    @property
    def state(self) -> bool:
        return self.state_bytes > 0


@dataclass(frozen=True)
class PrefixIndex:
    """What one shard caches, within `capacity_bytes`."""

    capacity_bytes: int
    needs_state: bool = False  # the shard holds recurrent-state layers
    blocks: Mapping[bytes, Block] = field(default_factory=dict)
    pins: Mapping[str, tuple[bytes, ...]] = field(default_factory=dict)  # owner -> chain

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes + b.state_bytes for b in self.blocks.values())

    def pinned(self) -> frozenset[bytes]:
        return frozenset(key for chain in self.pins.values() for key in chain)


@dataclass(frozen=True)
class Admission:
    """The result of offering a block: the new index, and what left it to make room."""

    index: PrefixIndex
    admitted: bool
    evicted_blocks: tuple[bytes, ...] = ()
    evicted_states: tuple[bytes, ...] = ()  # snapshots dropped, their blocks kept


def usable_depth(index: PrefixIndex, keys: Sequence[bytes]) -> int:
    """How many leading blocks of `keys` this shard can restore."""
    best = 0
    for depth, key in enumerate(keys, start=1):
        block = index.blocks.get(key)
        if block is None:
            break
        if not index.needs_state or block.state:
            best = depth
    return best


def pin(index: PrefixIndex, owner: str, keys: Sequence[bytes], now: float) -> PrefixIndex:
    """Keep the chain `keys` (all present) from eviction until `unpin(owner)`; marks it used.
    Raises KeyError for a key that is not cached."""
    blocks = dict(index.blocks)
    for key in keys:
        blocks[key] = replace(blocks[key], last_used=now)
    return replace(index, blocks=blocks, pins={**index.pins, owner: tuple(keys)})


def unpin(index: PrefixIndex, owner: str) -> PrefixIndex:
    if owner not in index.pins:
        return index
    return replace(index, pins={k: v for k, v in index.pins.items() if k != owner})


def admit(index: PrefixIndex, key: bytes, parent: bytes, nbytes: int, now: float, *,
          state_bytes: int = 0) -> Admission:
    """Offer a block (and optionally a snapshot at its end), evicting LRU entries for room.

    A block already cached is only marked used (and gains the snapshot if it had none). A block
    whose parent is not cached is refused: nothing could ever reach it. Nothing pinned is
    evicted, so a request that is restoring its prefix never loses it; when no room can be made
    the block is refused and the index is unchanged.
    """
    if parent != ROOT and parent not in index.blocks:
        return Admission(index, admitted=False)
    existing = index.blocks.get(key)
    extra = nbytes + state_bytes if existing is None else (
        state_bytes if state_bytes and not existing.state else 0)
    room = _make_room(index, extra, protect={key, parent})
    if room is None:
        return Admission(index, admitted=False)
    blocks, states = room
    trimmed = _without(index, blocks, states)
    table = dict(trimmed.blocks)
    if existing is None:
        table[key] = Block(parent, nbytes, now, state_bytes)
        if parent != ROOT:
            table[parent] = replace(table[parent], children=table[parent].children + 1)
    else:
        current = table[key]
        table[key] = replace(current, last_used=now,
                             state_bytes=current.state_bytes or state_bytes)
    return Admission(replace(trimmed, blocks=table), True, blocks, states)


def resize(index: PrefixIndex, capacity_bytes: int) -> Admission:
    """A new capacity; evicts LRU entries down to it (pinned ones stay, even above it)."""
    index = replace(index, capacity_bytes=capacity_bytes)
    over = index.nbytes - capacity_bytes
    if over <= 0:
        return Admission(index, True)
    blocks, states = _victims(index, over, protect=set())
    return Admission(_without(index, blocks, states), True, blocks, states)


def _make_room(index: PrefixIndex, extra: int,
               protect: set[bytes]) -> tuple[tuple[bytes, ...], tuple[bytes, ...]] | None:
    over = index.nbytes + extra - index.capacity_bytes
    if extra > index.capacity_bytes:
        return None
    if over <= 0:
        return (), ()
    blocks, states = _victims(index, over, protect)
    freed = sum(index.blocks[k].nbytes + index.blocks[k].state_bytes for k in blocks)
    freed += sum(index.blocks[k].state_bytes for k in states)
    return (blocks, states) if freed >= over else None


def _victims(index: PrefixIndex, need: int,
             protect: set[bytes]) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """LRU victims worth at least `need` bytes (fewer if not enough can go): snapshots of
    unpinned blocks, and unpinned leaves, re-evaluated as leaves are removed."""
    pinned = index.pinned() | protect
    children = {key: block.children for key, block in index.blocks.items()}
    gone_blocks: list[bytes] = []
    gone_states: list[bytes] = []
    freed = 0
    while freed < need:
        candidates = []
        for key, block in index.blocks.items():
            if key in pinned or key in gone_blocks:
                continue
            if children[key] == 0:
                size = block.nbytes + (0 if key in gone_states else block.state_bytes)
                candidates.append((block.last_used, key, True, size))
            elif block.state and key not in gone_states:
                candidates.append((block.last_used, key, False, block.state_bytes))
        if not candidates:
            break
        _, key, whole, size = min(candidates)
        if whole:
            gone_blocks.append(key)
            if key in gone_states:
                gone_states.remove(key)
            parent = index.blocks[key].parent
            if parent in children:
                children[parent] -= 1
        else:
            gone_states.append(key)
        freed += size
    return tuple(gone_blocks), tuple(gone_states)


def _without(index: PrefixIndex, blocks: Sequence[bytes], states: Sequence[bytes]) -> PrefixIndex:
    if not blocks and not states:
        return index
    table = dict(index.blocks)
    for key in blocks:
        block = table.pop(key)
        if block.parent in table:
            table[block.parent] = replace(table[block.parent],
                                          children=table[block.parent].children - 1)
    for key in states:
        table[key] = replace(table[key], state_bytes=0)
    return replace(index, blocks=table)
