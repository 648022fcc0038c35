"""A shard's decisions, as pure functions of plain data with the time passed in.

What to do with activations after a run of layers, whether a request's KV cache fits, where
a release goes next, which status a rejected frame earns, when idle requests expire and when
the compute thread must next wake to expire them. No MLX, no threads, no clocks: the runtime
(`dnet/shard/runtime.py`) does the I/O and calls these.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dnet.ring.frames import Status

DEFAULT_KV_TTL_S = 300.0  # an idle request's KV cache is dropped after this (`--kv-ttl`)
TOMBSTONE_TTL_S = 600.0  # how long a released request's id is remembered


class Move(enum.Enum):
    """What follows a run of layers on this shard."""

    FORWARD = "forward"  # later layers live elsewhere: send the activations on
    SAMPLE = "sample"  # the model's end, on a sampled step: the tail samples
    FILL_CACHE = "fill_cache"  # the model's end, on a prompt chunk: only the KV caches count


def after_run(end: int, num_layers: int, sample: bool) -> Move:
    """The move after running layers up to (not including) `end` of a `num_layers` model."""
    if end < num_layers:
        return Move.FORWARD
    return Move.SAMPLE if sample else Move.FILL_CACHE


def release_onward(layer: int | None, run_ends: Mapping[int, int], num_layers: int) -> int | None:
    """The layer to pass a release on to, or None to stop here.

    `layer` is where the release enters this shard (None: it is for this shard only);
    `run_ends` maps every held layer to the end of its contiguous run. A release goes on to
    the layer after the run it enters, unless that run ends the model (the ring is closed)
    or this shard does not hold `layer` (a stale release).
    """
    if layer is None or layer not in run_ends:
        return None
    end = run_ends[layer]
    return end if end < num_layers else None


@dataclass(frozen=True)
class KvRefusal:
    """A new request's KV cache would pass the cap."""

    need: int
    reserved: int
    cap: int

    @property
    def message(self) -> str:
        return (f"KV cache full on a shard: this request needs {self.need} bytes, "
                f"{self.cap - self.reserved} of {self.cap} are free; retry later or ask for "
                "fewer tokens")


def admit_kv(need: int, reserved: int, cap: int | None) -> KvRefusal | None:
    """None if `need` more bytes fit next to `reserved` under `cap` (None or 0: no cap)."""
    if cap and reserved + need > cap:
        return KvRefusal(need, reserved, cap)
    return None


RETRYABLE_REJECTIONS = frozenset({Status.FAILED_PRECONDITION, Status.NOT_FOUND})


def rejection_status(code: int) -> int:
    """The HTTP-style status for a request whose frame the next shard rejected with `code`.

    A next shard on another plan epoch or restarted (FAILED_PRECONDITION, NOT_FOUND) is a
    ring to re-plan: 503, which the entry may replay. Anything else is a bug: 500.
    """
    return 503 if code in RETRYABLE_REJECTIONS else 500


def position_error(expected: int, got: int, layer: int) -> str | None:
    """Why a step at KV position `got` cannot run layer `layer`, which expects `expected`."""
    if got == expected:
        return None
    return f"frame at position {got} but layer {layer} expects {expected}"


def expired(last_used: Mapping[str, float], now: float, ttl_s: float) -> list[str]:
    """The requests idle for more than `ttl_s` at `now`, given when each was last used."""
    return [request_id for request_id, used in last_used.items() if now - used > ttl_s]


def next_wake(deadlines: Iterable[float | None]) -> float | None:
    """The earliest of the deadlines that exist; None when there is nothing to wait for."""
    present = [d for d in deadlines if d is not None]
    return min(present) if present else None


def expiry_deadline(oldest: float | None, ttl_s: float) -> float | None:
    """When the oldest of a set of timestamps passes `ttl_s` (None for an empty set).

    The expiry checks use a strict `>`, so the deadline is just past `oldest + ttl_s`.
    """
    return None if oldest is None else oldest + ttl_s + 1e-3
