"""Progress for long work: a rich bar on a terminal, one log line when logging to a file."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("dnet")


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    if sys.stderr.isatty():
        from rich.progress import track

        yield from track(items, description=description, total=total, transient=True)
        return
    started = time.monotonic()
    count = 0
    for item in items:
        count += 1
        yield item
    log.info("%s: %d done in %.1f s", description, count, time.monotonic() - started)
