"""A stage's batch caches: the caches of the requests that travel in one train.

A request starts with caches of its own (prefill runs one request at a time). When a batched
frame names it as a member of a train, its caches are merged into that train's batch caches
(mlx-lm's batch form of each cache type: BatchKVCache padded on the left, ArraysCache with one
row per member); members that left are filtered out. For these types a batched decode step
gives bit for bit the logits of single steps (tests/test_batching.py checks it for every
model type), so batching keeps the tokens identical. Not so for sliding-window caches: a
BatchRotatingKVCache holds its members' keys in rotated order when their lengths straddle
the window, which moves the last bits of the logits, so models with sliding windows decode
one request per frame (`batchable`), never wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache

from dnet.stage import Cache

# Cache types whose batch caches reproduce single steps exactly.
EXACT_BATCH_CACHES = (KVCache, ArraysCache)


def batchable(cache_templates: list[Cache | None]) -> bool:
    """Whether a model's requests may share batched decode steps without changing a bit."""
    return all(type(cache) in EXACT_BATCH_CACHES for cache in cache_templates
               if cache is not None)


@dataclass
class Group:
    members: list[str]
    caches: dict[int, Cache]  # layer -> batch cache with one row per member


@dataclass
class GroupCaches:
    groups: dict[str, Group] = field(default_factory=dict)

    def caches_for(self, group_id: str, members: list[str],
                   own_caches: dict[str, dict[int, Cache]]) -> dict[int, Cache]:
        """The batch caches of `group_id`, reshaped to exactly `members`, in that order.

        Members new to the group bring their own caches from `own_caches` (and give them
        up); members missing from `members` are dropped. Members must keep their relative
        order, new ones after the old, which is how the tail builds trains.
        """
        group = self.groups.get(group_id)
        if group is None:
            layers = next(iter(own_caches.values())).keys()
            caches = {layer: type(own_caches[members[0]][layer]).merge(
                [own_caches[m][layer] for m in members]) for layer in layers}
            self.groups[group_id] = Group(list(members), caches)
            return caches
        kept = [i for i, m in enumerate(group.members) if m in members]
        if len(kept) < len(group.members):
            for cache in group.caches.values():
                cache.filter(mx.array(kept))
            group.members = [group.members[i] for i in kept]
        joining = [m for m in members if m not in group.members]
        if joining:
            for layer, cache in group.caches.items():
                cache.extend(type(own_caches[joining[0]][layer]).merge(
                    [own_caches[m][layer] for m in joining]))
            group.members += joining
        if group.members != list(members):
            raise ValueError(f"train {group_id} members out of order: have {group.members}, "
                             f"frame names {list(members)}")
        return group.caches

    def member_left(self, request_id: str) -> None:
        """Drop a released request's row; a group left empty is dropped whole."""
        for group_id, group in list(self.groups.items()):
            if request_id in group.members:
                kept = [i for i, m in enumerate(group.members) if m != request_id]
                if not kept:
                    del self.groups[group_id]
                    continue
                for cache in group.caches.values():
                    cache.filter(mx.array(kept))
                group.members = [group.members[i] for i in kept]

    def group_of(self, request_id: str) -> str | None:
        return next((g for g, group in self.groups.items() if request_id in group.members),
                    None)
