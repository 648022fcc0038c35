"""An in-process network: Ring servicers reachable by address, without sockets.

`MemoryNetwork` is a `Transport` (see `dnet.ring.links`): shard runtimes and entries built
with it reach each other's real servicers (`ShardService`, `EntryService`) as they would
over the network: each stream has its own handler thread, every message is serialized and
parsed again (so nothing that would not survive the wire gets through), replies come back on
the stream, and a peer that is `kill`ed breaks the streams to it with UNAVAILABLE, as a dead
process does. Tests use it to run a whole ring in one process; nothing here is for speed.
`connect(address).stub` also offers the streams as gRPC's iterator-style calls.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring.links import OnReply, StreamMethod
from dnet.ring.tcp import ServicerContext

_END = object()
_CLOSE = object()


class MemoryRpcError(grpc.RpcError):  # type: ignore[misc]  # grpc is untyped
    """What a broken in-memory stream or a failed call raises, shaped like gRPC's errors."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _context() -> ServicerContext:
    return ServicerContext("memory", MemoryRpcError)


def _copy(message: Any) -> Any:
    """The message as the other end of a wire would see it."""
    return type(message).FromString(message.SerializeToString())


class _Stream:
    """One bidirectional stream: a handler thread runs the servicer's method on it."""

    def __init__(self, handler: Callable[[Iterator[Any], ServicerContext], Iterator[Any]] | None,
                 requests: Iterator[Any], address: str) -> None:
        self._replies: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._broken = threading.Event()
        if handler is None:
            self.fail(grpc.StatusCode.UNAVAILABLE, f"nothing listens on {address}")
            return
        threading.Thread(target=self._serve, args=(handler, requests), daemon=True,
                         name=f"memory-{address}").start()

    def _serve(self, handler: Callable[[Iterator[Any], ServicerContext], Iterator[Any]],
               requests: Iterator[Any]) -> None:
        try:
            for reply in handler(self._incoming(requests), _context()):
                if self._broken.is_set():
                    return
                self._replies.put(_copy(reply))
        except Exception as exc:  # a servicer bug ends the stream, as gRPC's UNKNOWN does
            self.fail(grpc.StatusCode.UNKNOWN, f"handler raised {exc!r}")
            return
        self._replies.put(_END)

    def _incoming(self, requests: Iterator[Any]) -> Iterator[Any]:
        for message in requests:
            if self._broken.is_set():
                return
            yield _copy(message)

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        if not self._broken.is_set():
            self._broken.set()
            self._replies.put(MemoryRpcError(code, details))

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = self._replies.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, MemoryRpcError):
            self._replies.put(item)  # a broken stream stays broken
            raise item
        return item


class _Stub:
    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    def Frames(self, messages: Iterator[Any]) -> Iterator[Any]:  # noqa: N802 - gRPC's name
        return self._connection.open("Frames", messages)

    def Tokens(self, messages: Iterator[Any]) -> Iterator[Any]:  # noqa: N802 - gRPC's name
        return self._connection.open("Tokens", messages)


class _Connection:
    def __init__(self, network: MemoryNetwork, address: str) -> None:
        self._network = network
        self.address = address
        self.stub = _Stub(self)
        self.streams: list[_Stream] = []

    def open(self, method: str, messages: Iterator[Any]) -> _Stream:
        return self._network._open(self, method, messages)

    def close(self) -> None:
        """Like closing a channel: the streams opened through it are cancelled."""
        self._network._forget(self)
        for stream in self.streams:
            stream.fail(grpc.StatusCode.CANCELLED, "the channel was closed")


class MemoryNetwork:
    """Addresses served by servicers in this process; thread-safe."""

    def __init__(self) -> None:
        self._servicers: dict[str, pb_grpc.RingServicer] = {}
        self._connections: dict[str, list[_Connection]] = {}
        self._lock = threading.Lock()

    def serve(self, address: str, servicer: pb_grpc.RingServicer) -> None:
        """Answer `address` with `servicer` (replacing whatever answered it before)."""
        with self._lock:
            self._servicers[address] = servicer

    def kill(self, address: str) -> None:
        """The peer at `address` vanishes: its open streams break, new ones fail."""
        with self._lock:
            self._servicers.pop(address, None)
            streams = [s for c in self._connections.get(address, []) for s in c.streams]
        for stream in streams:
            stream.fail(grpc.StatusCode.UNAVAILABLE, f"{address} went away")

    def open(self, address: str, method: StreamMethod, on_reply: OnReply,
             on_broken: Callable[[str], None]) -> _LinkStream:
        """A `links.Stream` of `method` to the servicer at `address` (`links.Transport`)."""
        return _LinkStream(self.connect(address), method, on_reply, on_broken)

    def connect(self, address: str) -> _Connection:
        connection = _Connection(self, address)
        with self._lock:
            self._connections.setdefault(address, []).append(connection)
        return connection

    def call(self, address: str, method: str, request: Any) -> Any:
        """A unary call (`Forward`, `Release`, `Health`); raises MemoryRpcError on abort."""
        with self._lock:
            servicer = self._servicers.get(address)
        if servicer is None:
            raise MemoryRpcError(grpc.StatusCode.UNAVAILABLE, f"nothing listens on {address}")
        return _copy(getattr(servicer, method)(_copy(request), _context()))

    def _open(self, connection: _Connection, method: str, messages: Iterator[Any]) -> _Stream:
        with self._lock:
            servicer = self._servicers.get(connection.address)
            handler = None if servicer is None else getattr(servicer, method)
            stream = _Stream(handler, messages, connection.address)
            connection.streams.append(stream)
        return stream

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            connections = self._connections.get(connection.address, [])
            if connection in connections:
                connections.remove(connection)


class _LinkStream:
    """A link's stream over an in-memory connection: `send` queues for the handler thread,
    a reader thread hands replies to `on_reply` and reports the end of the stream once."""

    def __init__(self, connection: _Connection, method: StreamMethod, on_reply: OnReply,
                 on_broken: Callable[[str], None]) -> None:
        self._connection = connection
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = threading.Event()
        replies = connection.open(method.handler_name, self._drain())
        threading.Thread(target=self._read, args=(replies, on_reply, on_broken),
                         name=f"link-{connection.address}", daemon=True).start()

    def send(self, message: Any) -> None:
        if not self._closed.is_set():
            self._outbox.put(message)

    def close(self) -> None:
        self._closed.set()
        self._outbox.put(_CLOSE)
        self._connection.close()

    def _drain(self) -> Iterator[Any]:
        while (message := self._outbox.get()) is not _CLOSE:
            yield message

    def _read(self, replies: Iterator[Any], on_reply: OnReply,
              on_broken: Callable[[str], None]) -> None:
        try:
            for reply in replies:
                on_reply(reply)
            reason = "the peer closed the stream"
        except grpc.RpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        self._outbox.put(_CLOSE)  # ends the handler's reading of a dead stream
        if not self._closed.is_set():
            on_broken(reason)
