"""Which decode steps travel round the ring together: the tail's batching decisions.

A *train* is a set of requests whose decode steps move as one batched frame: one forward
pass per stage for all of them. With S stages, S trains keep every stage busy at once (one
train per stage, like a pipeline), and batching within a train makes each stage's pass
cheaper per token. A new request starts its own train while there are fewer than S;
otherwise it waits at the tail (at most one ring cycle) and boards the next train that
passes. A train that has been a batch stays one until it empties, so its members' KV caches
stay in one batch cache on every stage.

A lone request's train has the request's own id, and its steps travel as request steps
(its KV caches stay its own); a batched train gets a fresh id when it forms, and its steps
travel as train steps (see `dnet.ring.frames`).

Pure data logic: no MLX, no networking; train ids come from `new_id`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_MAX_BATCH = 32


@dataclass(frozen=True)
class Dispatch:
    """Send the next decode step of `members` as train `train_id`."""

    train_id: str
    members: tuple[str, ...]
    batched: bool  # a batch frame (group caches on every stage) rather than a single frame


def _random_id() -> str:
    return uuid.uuid4().hex


@dataclass
class TrainScheduler:
    max_trains: int = 1  # one per stage of the ring, learned from the first frames' routes
    max_batch: int = DEFAULT_MAX_BATCH
    trains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    batched: set[str] = field(default_factory=set)
    waiting: list[str] = field(default_factory=list)
    new_id: Callable[[], str] = field(default_factory=lambda: _random_id)

    def running(self, train_id: str) -> bool:
        """Whether `train_id` is a train on its way round the ring."""
        return train_id in self.trains

    def count_stages(self, stages: int) -> None:
        """The ring has at least `stages` stages: allow that many trains at once."""
        self.max_trains = max(self.max_trains, stages)

    def reset_stages(self) -> None:
        """A new ring: relearn its number of stages from its frames."""
        self.max_trains = 1

    def ready(self, request_id: str) -> list[Dispatch]:
        """A request's first token is out: start a train, or wait for one to pass."""
        if len(self.trains) < self.max_trains:
            self.trains[request_id] = (request_id,)
            return [Dispatch(request_id, (request_id,), batched=False)]
        self.waiting.append(request_id)
        return []

    def passed(self, train_id: str, continuing: list[str]) -> list[Dispatch]:
        """Train `train_id` finished a step at the tail; `continuing` go on, in order."""
        self.trains.pop(train_id, None)
        was_batched = train_id in self.batched
        self.batched.discard(train_id)
        room = max(0, self.max_batch - len(continuing))
        boarding, self.waiting = self.waiting[:room], self.waiting[room:]
        members = tuple(continuing) + tuple(boarding)
        if not members:
            return []
        if len(members) == 1 and not was_batched:
            self.trains[members[0]] = members
            return [Dispatch(members[0], members, batched=False)]
        # A single request keeps its own id as a train; a batch gets a fresh id whenever it
        # forms, so every stage builds its batch cache for it once.
        batch_id = train_id if was_batched else self.new_id()
        self.trains[batch_id] = members
        self.batched.add(batch_id)
        return [Dispatch(batch_id, members, batched=True)]

    def forget(self, request_id: str) -> None:
        """The request ended outside a step (released, failed): it boards nothing."""
        if request_id in self.waiting:
            self.waiting.remove(request_id)
        for train_id, members in list(self.trains.items()):
            if request_id in members:
                remaining = tuple(m for m in members if m != request_id)
                if remaining:
                    self.trains[train_id] = remaining
                else:
                    del self.trains[train_id]
                    self.batched.discard(train_id)

    def drain_waiting(self) -> list[Dispatch]:
        """Start trains for waiting requests when trains are missing (e.g. one emptied)."""
        dispatches = []
        while self.waiting and len(self.trains) < self.max_trains:
            dispatches += self.ready(self.waiting.pop(0))
        return dispatches
