"""Rate-limited warnings: the first of a kind is logged at once, repeats at most once a minute.

A peer with a skewed clock or the wrong key calls every second; one line per call buries the
log. `should_log` is the rule (pure, time passed in); `LogLimiter` applies it under a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

REPEAT_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Seen:
    logged_at: float  # when a line for this key was last logged (monotonic seconds)
    suppressed: int = 0  # repeats since, not logged


def should_log(seen: Mapping[Hashable, Seen], key: Hashable, now: float,
               interval_s: float = REPEAT_INTERVAL_S) -> tuple[dict[Hashable, Seen], int | None]:
    """Record one occurrence of `key`. Returns the new table and, when a line is due, how many
    repeats it stands for besides itself (0 for the first); None while the key is quiet."""
    table = dict(seen)
    previous = table.get(key)
    if previous is None or now - previous.logged_at >= interval_s:
        table[key] = Seen(now)
        return table, previous.suppressed if previous is not None else 0
    table[key] = Seen(previous.logged_at, previous.suppressed + 1)
    return table, None


class LogLimiter:
    """`warning(key, message, *args)` logs through `logger` at most once per interval per key,
    saying how many identical warnings it left out."""

    def __init__(self, logger: logging.Logger, interval_s: float = REPEAT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._seen: dict[Hashable, Seen] = {}
        self._lock = threading.Lock()

    def warning(self, key: Hashable, message: str, *args: object) -> None:
        with self._lock:
            self._seen, repeats = should_log(self._seen, key, self._clock(), self._interval_s)
        if repeats is None:
            return
        if repeats:
            message += f" ({repeats} more like it in the last {self._interval_s:.0f} s)"
        self._logger.warning(message, *args)
