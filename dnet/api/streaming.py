"""Plumbing shared by the surfaces: server-sent events, n choices at once, and clients that
go away (their requests are cancelled, which releases the ring's KV caches)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from dnet.api.errors import ApiError, ring_error
from dnet.api.generation import close
from dnet.entry import RingError

T = TypeVar("T")
FAILURES = (RingError, ApiError)  # what can end an answer that has started
DISCONNECT_POLL_S = 0.5
_DONE = object()


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


def sse(data: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def merge(sources: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they come, tagged with the source's index. An
    exception from any source is raised here; closing this closes every source."""
    if len(sources) == 1:
        try:
            async for item in sources[0]:
                yield 0, item
        finally:
            await close(sources[0])
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, source: AsyncIterator[T]) -> None:
        try:
            async for item in source:
                await queue.put((index, item))
        except Exception as exc:  # handed to the reader, who raises it
            await queue.put((index, exc))
        await queue.put((index, _DONE))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(sources)]
    try:
        left = len(tasks)
        while left:
            index, item = await queue.get()
            if item is _DONE:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def first_item(source: AsyncIterator[T]) -> tuple[T, AsyncIterator[T]]:
    """The first item, then the whole sequence again: a ring that fails before answering
    becomes an HTTP error status rather than a 200 whose stream breaks."""
    try:
        first = await anext(source)
    except RingError as exc:
        raise ring_error(exc.status, exc.message) from exc

    async def again() -> AsyncIterator[T]:
        try:
            yield first
            async for item in source:
                yield item
        finally:
            await close(source)

    return first, again()


# Rendering and tokenizing a prompt is CPU work (seconds for a prompt of megabytes): it runs
# here, not on the event loop, so other clients' streams and /health go on meanwhile. One
# thread: a tokenizer is not meant to encode from several threads at once.
_RENDERER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")


async def off_the_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on the prompt-rendering thread; its result or its exception."""
    return await asyncio.get_running_loop().run_in_executor(
        _RENDERER, partial(fn, *args, **kwargs))


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client goes away (ClientGone); a RingError becomes
    an ApiError."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()  # frees the request's KV caches through the entry
                raise ClientGone()
        return task.result()
    except RingError as exc:
        raise ring_error(exc.status, exc.message) from exc
    finally:
        if not task.done():
            task.cancel()


def stream_error(exc: RingError | ApiError) -> ApiError:
    return exc if isinstance(exc, ApiError) else ring_error(exc.status, exc.message)
