"""What a shard keeps per request, and the tables that hold it.

`RequestTable` belongs to the compute thread (no lock: MLX caches live there), and so does
`TrainCaches`, which knows whether a request's KV caches are its own or rows of a train's
batch caches. `RequestIds` is consulted by gRPC threads as frames arrive, so it has its own
lock. `KvReservations` counts the KV bytes requests may grow to. Time is always passed in.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dnet.ring.frames import FrameRejected, RequestStep, Status, Step, TrainStep
from dnet.shard.decisions import KvRefusal, admit_kv, expired
from dnet.shard.groups import GroupCaches

if TYPE_CHECKING:
    from dnet.sampling import TokenSampler

Cache = Any  # an mlx-lm cache object (KVCache, RotatingKVCache, ArraysCache, ...)


@dataclass(frozen=True)
class OwnCaches:
    """The request's KV caches are its own, one per held layer (it has not joined a train)."""

    caches: dict[int, Cache]


@dataclass(frozen=True)
class InTrain:
    """The request's KV caches are rows of train `train_id`'s batch caches, for good."""

    train_id: str


@dataclass
class TailState:
    """What only the tail keeps per request: its sampler and where its decode stands."""

    sampler: TokenSampler
    max_tokens: int
    eos_token_ids: frozenset[int]
    generated: int = 0
    next_token: int = -1  # the input of the request's next decode step
    next_position: int = 0  # that step's KV position


@dataclass
class ActiveRequest:
    entry: str  # where tokens and failures go
    head: str  # the shard holding layer 0
    epoch: int
    kv: OwnCaches | InTrain
    tail: TailState | None  # None on shards that do not hold the model's last layer
    positions: dict[int, int] = field(default_factory=dict)  # run start -> next KV position
    sent_to: set[str] = field(default_factory=set)  # shards this request's frames went to


class RequestTable:
    """The requests open on this shard, with when each was last used (oldest first)."""

    def __init__(self) -> None:
        self._requests: dict[str, ActiveRequest] = {}
        self._last_used: dict[str, float] = {}  # insertion order is use order

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._requests))

    def get(self, request_id: str) -> ActiveRequest | None:
        return self._requests.get(request_id)

    def __getitem__(self, request_id: str) -> ActiveRequest:
        return self._requests[request_id]

    def open(self, request_id: str, request: ActiveRequest, now: float) -> None:
        self._requests[request_id] = request
        self._last_used[request_id] = now

    def pop(self, request_id: str) -> ActiveRequest | None:
        self._last_used.pop(request_id, None)
        return self._requests.pop(request_id, None)

    def touch(self, request_ids: tuple[str, ...], now: float) -> None:
        for request_id in request_ids:
            self._last_used.pop(request_id, None)
            self._last_used[request_id] = now

    def sent_to(self, address: str) -> list[str]:
        """The requests whose frames went to `address`."""
        return [r for r, request in self._requests.items() if address in request.sent_to]

    def from_entry(self, address: str) -> list[str]:
        """The requests the entry at `address` owns."""
        return [r for r, request in self._requests.items() if request.entry == address]

    def expired(self, now: float, ttl_s: float) -> list[str]:
        return expired(self._last_used, now, ttl_s)

    def oldest_use(self) -> float | None:
        return next(iter(self._last_used.values()), None)


class RequestIds:
    """The request ids a shard has seen open, and those released recently (tombstones).

    Kept apart from the compute thread's tables because gRPC threads consult it: a frame
    that overtook its request's release must be dropped, not start a cache that never ends.
    """

    def __init__(self, tombstone_ttl_s: float) -> None:
        self._known: set[str] = set()
        self._released: dict[str, float] = {}  # insertion order is release order
        self._ttl_s = tombstone_ttl_s
        self._lock = threading.Lock()

    def admit(self, step: Step) -> bool:
        """False for a late step of a released request; raises FrameRejected (NOT_FOUND)
        for a step of a request never opened here."""
        with self._lock:
            if isinstance(step, RequestStep) and step.opening is not None:
                # Opens the request, or starts a later round of it on a multi-round ring.
                if step.request_id in self._released:
                    return False
                self._known.add(step.request_id)
                return True
            members = step.members if isinstance(step, TrainStep) else (step.request_id,)
            unknown = [m for m in members if m not in self._known and m not in self._released]
            if unknown:
                raise FrameRejected(Status.NOT_FOUND, f"unknown request {unknown[0]}")
            return True

    def release(self, request_id: str, now: float) -> None:
        with self._lock:
            self._known.discard(request_id)
            self._released.pop(request_id, None)
            self._released[request_id] = now

    def prune(self, now: float) -> None:
        with self._lock:
            for request_id in expired(self._released, now, self._ttl_s):
                del self._released[request_id]

    def oldest_release(self) -> float | None:
        with self._lock:
            return next(iter(self._released.values()), None)


class KvReservations:
    """KV bytes reserved per request (prompt plus answer, worst case) against a cap."""

    def __init__(self, cap_bytes: int | None) -> None:
        self.cap_bytes = cap_bytes
        self._reserved: dict[str, int] = {}

    @property
    def reserved_bytes(self) -> int:
        return sum(self._reserved.values())

    def reserve(self, request_id: str, need: int) -> KvRefusal | None:
        """Reserve `need` bytes for the request, or say why not (and reserve nothing)."""
        refusal = admit_kv(need, self.reserved_bytes, self.cap_bytes)
        if refusal is None:
            self._reserved[request_id] = need
        return refusal

    def release(self, request_id: str) -> None:
        self._reserved.pop(request_id, None)


class TrainCaches:
    """The caches a step runs on: a request's own, or its train's batch caches.

    A request joins a train's batch caches the first time a train step names it, and stays
    there until it ends (`InTrain`); a lone request step on such a request is a bug.
    """

    def __init__(self) -> None:
        self._groups = GroupCaches()

    def for_step(self, step: Step, request_ids: tuple[str, ...],
                 requests: list[ActiveRequest]) -> dict[int, Cache]:
        """The caches for `step`'s rows `request_ids` (whose requests are `requests`).

        Raises RuntimeError when a request's caches are in another train than the step's.
        """
        if isinstance(step, RequestStep):
            kv = requests[0].kv
            if isinstance(kv, InTrain):
                raise RuntimeError(f"request {step.request_id} rides train {kv.train_id}; "
                                   "a lone step cannot use its caches")
            return kv.caches
        own: dict[str, dict[int, Cache]] = {}
        for request_id, request in zip(request_ids, requests, strict=True):
            if isinstance(request.kv, OwnCaches):
                own[request_id] = request.kv.caches
            elif request.kv.train_id != step.train_id:
                raise RuntimeError(f"request {request_id} rides train {request.kv.train_id}, "
                                   f"not {step.train_id}")
        caches = self._groups.caches_for(step.train_id, list(request_ids), own)
        for request in requests:
            request.kv = InTrain(step.train_id)
        return caches

    def leave(self, request_id: str, request: ActiveRequest) -> None:
        """The request ended: drop its row from its train's batch caches."""
        if isinstance(request.kv, InTrain):
            self._groups.member_left(request_id)

    def members(self, train_id: str) -> list[str]:
        """The members of train `train_id` here (empty if no such train)."""
        group = self._groups.groups.get(train_id)
        return list(group.members) if group is not None else []
