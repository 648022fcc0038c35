"""The entry's state shared between threads: the requests in flight, and the ring to use.

The event loop runs requests; gRPC threads deliver tokens; link threads report failures;
the mesh node's control threads pause, drain and resume. Everything here is guarded by a
lock, and everything that waits waits on an event: coroutines on asyncio futures that other
threads complete with `call_soon_threadsafe`, the draining thread on a condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from dnet.entry import decisions
from dnet.entry.decisions import Refusal, RingView
from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring import frames

T = TypeVar("T")


async def within(awaitable: Awaitable[T], timeout_s: float) -> T:
    """`await awaitable`, raising TimeoutError after `timeout_s` seconds.

    Not `asyncio.wait_for`: on Python 3.11 it returns the result and swallows a cancellation
    that arrives as the awaited thing completes (CPython gh-86296, fixed in 3.12), and a
    request whose client left would then generate to its end. `asyncio.timeout` does not.
    """
    async with asyncio.timeout(timeout_s):
        return await awaitable


@dataclass(frozen=True)
class _Attempt:
    loop: asyncio.AbstractEventLoop
    tokens: asyncio.Queue[pb.Token]
    head: str


class Inflight:
    """The requests an entry runs, and their attempts on the ring, by the id shards know."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when an attempt ends
        self._attempts: dict[str, _Attempt] = {}
        self._requests = 0

    @property
    def requests(self) -> int:
        """Requests in progress, including those waiting for a ring."""
        return self._requests

    @property
    def attempts(self) -> int:
        return len(self._attempts)

    def enter(self, max_requests: int, listening: bool) -> Refusal | None:
        """Count one more request, unless it is refused (then say why)."""
        with self._lock:
            refusal = decisions.admission(self._requests, max_requests, listening)
            if refusal is None:
                self._requests += 1
            return refusal

    def leave(self) -> None:
        with self._lock:
            self._requests -= 1

    def open(self, request_id: str, head: str) -> asyncio.Queue[pb.Token]:
        """Start an attempt sent to `head`; its tokens arrive on the returned queue.

        Call from the event loop that reads the queue.
        """
        tokens: asyncio.Queue[pb.Token] = asyncio.Queue()
        with self._lock:
            self._attempts[request_id] = _Attempt(asyncio.get_running_loop(), tokens, head)
        return tokens

    def close(self, request_id: str) -> None:
        with self._lock:
            self._attempts.pop(request_id, None)
            self._idle.notify_all()

    def deliver(self, token: pb.Token) -> None:
        """Hand a token from the ring to its attempt (any thread); unknown ids are dropped."""
        with self._lock:
            attempt = self._attempts.get(token.request_id)
        if attempt is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody listens
                attempt.loop.call_soon_threadsafe(attempt.tokens.put_nowait, token)

    def fail(self, request_id: str, status: int, message: str) -> None:
        self.deliver(frames.failure(request_id, status, message))

    def fail_sent_to(self, head: str, status: int, message: str) -> None:
        """Fail every attempt whose frames went to `head`."""
        with self._lock:
            ids = [r for r, attempt in self._attempts.items() if attempt.head == head]
        for request_id in ids:
            self.fail(request_id, status, message)

    def wait_idle(self, timeout_s: float) -> list[str]:
        """Wait until no attempt is in flight, at most `timeout_s`; the ids still in flight.

        Blocks: call from a thread, never the event loop.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._attempts:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(left)
            return list(self._attempts)


class RingGate:
    """The ring an entry sends new attempts to, and the coroutines waiting for it to change."""

    def __init__(self, view: RingView) -> None:
        self._lock = threading.Lock()
        self._view = view
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def view(self) -> RingView:
        return self._view

    def set(self, view: RingView) -> None:
        """Switch to `view` (any thread) and wake every waiter to look at it."""
        with self._lock:
            self._view = view
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # a closed loop has nobody waiting
                loop.call_soon_threadsafe(_wake, future)

    async def wait_for(self, ready: Callable[[RingView], bool],
                       timeout_s: float) -> RingView | None:
        """The first view `ready` accepts, within `timeout_s`; None if none came."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            future: asyncio.Future[None] = loop.create_future()
            with self._lock:
                if ready(self._view):
                    return self._view
                self._waiters.append((loop, future))
            try:
                await within(future, max(0.0, deadline - loop.time()))
            except TimeoutError:
                with self._lock:
                    return self._view if ready(self._view) else None
            finally:
                with self._lock:
                    if (loop, future) in self._waiters:
                        self._waiters.remove((loop, future))


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
