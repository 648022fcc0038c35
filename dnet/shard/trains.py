"""Which decode steps travel round the ring together: the tail's batching decisions.

A *train* is a set of requests whose decode steps move as one batched frame: one forward
pass per stage for all of them. With S stages, S trains keep every stage busy at once (one
train per stage, like a pipeline), and batching within a train makes each stage's pass
cheaper per token. A new request starts its own train while there are fewer than S;
otherwise it waits at the tail (at most one ring cycle) and boards a train as it passes.
Trains are kept the same size: a passing train takes waiting requests only up to its fair
share, ceil(requests decoding / S), so that with N requests every stage runs batches of
about N / S, never one train of N - 1 and one of 1 (the stage holding the big one would be
the pipeline's bottleneck while the other idles). A train that has been a batch stays one
until it empties, so its members' KV caches stay in one batch cache on every stage.

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

    def share(self, others: list[int]) -> int:
        """The fair size of one more train next to trains of sizes `others`.

        The requests decoding (in trains or waiting), q * max_trains + r of them, are best
        carried by r trains of q + 1 and the rest of q: a train gets q + 1 while fewer than r
        others are bigger than q (never more than max_batch, never less than 1)."""
        decoding = len(self.waiting) + sum(len(members) for members in self.trains.values())
        q, r = divmod(decoding, self.max_trains)
        bigger = sum(1 for size in others if size > q)
        return max(1, min(self.max_batch, q + (1 if bigger < r else 0)))

    def passed(self, train_id: str, continuing: list[str]) -> list[Dispatch]:
        """Train `train_id` finished a step at the tail; `continuing` go on, in order.

        The train takes waiting requests up to its fair share (`share`); requests still
        waiting start trains of their own while there are fewer than `max_trains`."""
        self.trains.pop(train_id, None)
        was_batched = train_id in self.batched
        self.batched.discard(train_id)
        others = [len(members) for members in self.trains.values()]
        self.trains[train_id] = tuple(continuing)  # counted among the requests decoding
        room = max(0, self.share(others) - len(continuing))
        del self.trains[train_id]
        boarding, self.waiting = self.waiting[:room], self.waiting[room:]
        members = tuple(continuing) + tuple(boarding)
        dispatches = [self._dispatch(train_id if was_batched else None, members)] \
            if members else []
        return dispatches + self.drain_waiting()

    def _dispatch(self, batch_id: str | None, members: tuple[str, ...]) -> Dispatch:
        """Start `members` as a train: a lone request under its own id, a batch under
        `batch_id` (a batch going on) or a fresh id (a batch forming: every stage builds
        its batch cache for it once)."""
        if len(members) == 1 and batch_id is None:
            self.trains[members[0]] = members
            return Dispatch(members[0], members, batched=False)
        batch_id = batch_id or self.new_id()
        self.trains[batch_id] = members
        self.batched.add(batch_id)
        return Dispatch(batch_id, members, batched=True)

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
        """Start trains for waiting requests when trains are missing (e.g. one emptied), each
        of at most the fair share."""
        dispatches = []
        while self.waiting and len(self.trains) < self.max_trains:
            size = self.share([len(members) for members in self.trains.values()])
            boarding, self.waiting = self.waiting[:size], self.waiting[size:]
            dispatches.append(self._dispatch(None, tuple(boarding)))
        return dispatches
