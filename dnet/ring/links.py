"""Persistent streams to ring neighbours, over gRPC or any other `Transport`.

A unary call per frame costs a round trip; a stream kept open per neighbour lets the sender
write and move on. A link notices a dead peer from the stream's error (at once when the
process dies, within a few seconds through keepalive when the host vanishes) and reports it,
so the owner can fail the requests it had sent that way instead of letting them hang.

Who is at the other end of an address is the `Transport`'s business: `GRPC` dials the real
network (`auth.channel`); `dnet.ring.memory.MemoryNetwork` connects to servicers in the same
process. Shard runtimes and entries take a transport as a constructor argument.
"""

from __future__ import annotations

import errno
import logging
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grpc

from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring import auth

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
]
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.max_pings_without_data", 0),
    # A dead peer must fail the next call at once, not after exponential reconnect backoff.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    *_KEEPALIVE,
]
SERVER_OPTIONS = [
    # grpc listens with SO_REUSEPORT by default: a second process on the same port would
    # share it and take calls meant for this one. Listening sockets are exclusive.
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
    *_KEEPALIVE,
]

_CLOSE = object()

class RingStub(Protocol):
    """The streaming calls of the Ring service, as `pb_grpc.RingStub` makes them."""

    def Frames(self, messages: Iterator[Any]) -> Iterator[Any]: ...  # noqa: N802

    def Tokens(self, messages: Iterator[Any]) -> Iterator[Any]: ...  # noqa: N802


class Connection(Protocol):
    """An open connection to one address; a broken stream raises grpc.RpcError."""

    @property
    def stub(self) -> RingStub: ...

    def close(self) -> None: ...


class Transport(Protocol):
    def connect(self, address: str) -> Connection:
        """A connection to `address`; connecting is lazy, failures show on the streams."""
        ...


class _GrpcConnection:
    def __init__(self, address: str) -> None:
        self._channel = auth.channel(address)
        self.stub = pb_grpc.RingStub(self._channel)

    def close(self) -> None:
        self._channel.close()


class GrpcTransport:
    """The real network: authenticated gRPC channels (`dnet.ring.auth`)."""

    def connect(self, address: str) -> Connection:
        return _GrpcConnection(address)


GRPC = GrpcTransport()

OpenStream = Callable[[RingStub, Iterator[Any]], Iterator[Any]]
OnBroken = Callable[[str, list[Any], str], None]


def open_frames(stub: RingStub, messages: Iterator[Any]) -> Iterator[Any]:
    return stub.Frames(messages)


def open_tokens(stub: RingStub, messages: Iterator[Any]) -> Iterator[Any]:
    return stub.Tokens(messages)


class StreamLink:
    """One open client stream to `address`; `send` never blocks on the network."""

    def __init__(
        self,
        address: str,
        open_stream: OpenStream,
        on_reply: Callable[[Any], None],
        on_broken: OnBroken,
        transport: Transport = GRPC,
    ) -> None:
        self.address = address
        self._open_stream = open_stream
        self._on_reply = on_reply
        self._on_broken = on_broken
        self._connection = transport.connect(address)
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue[Any] | None = None
        self._closed = False

    def send(self, message: Any) -> None:
        """Queue `message` on the stream (opened on first use); raises ConnectionError once
        the link is closed. A broken stream is reported through `on_broken`, not here."""
        with self._lock:
            if self._closed:
                raise ConnectionError(f"link to {self.address} is closed")
            if self._outbox is None:
                self._outbox = queue.SimpleQueue()
                replies = self._open_stream(self._connection.stub, _drain(self._outbox))
                threading.Thread(
                    target=self._read_replies,
                    args=(replies, self._outbox),
                    name=f"link-{self.address}",
                    daemon=True,
                ).start()
            self._outbox.put(message)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._outbox is not None:
                self._outbox.put(_CLOSE)
                self._outbox = None
        self._connection.close()

    def _read_replies(self, replies: Iterator[Any], outbox: queue.SimpleQueue[Any]) -> None:
        try:
            for reply in replies:
                self._on_reply(reply)
            reason = "the peer closed the stream"
        except grpc.RpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        except ValueError as exc:  # grpc raises this once the channel is closed under us
            reason = str(exc)
        with self._lock:
            if self._outbox is outbox:
                self._outbox = None
            closed = self._closed
        unsent = _pending(outbox)
        outbox.put(_CLOSE)  # ends grpc's reader of the dead stream's request iterator
        if not closed:
            log.warning("link to %s broke: %s", self.address, reason)
            self._on_broken(self.address, unsent, reason)


def _drain(outbox: queue.SimpleQueue[Any]) -> Iterator[Any]:
    while True:
        message = outbox.get()
        if message is _CLOSE:
            return
        yield message


def _pending(outbox: queue.SimpleQueue[Any]) -> list[Any]:
    unsent: list[Any] = []
    while True:
        try:
            message = outbox.get_nowait()
        except queue.Empty:
            return unsent
        if message is not _CLOSE:
            unsent.append(message)


class LinkPool:
    """One link per peer address, created on first use."""

    def __init__(self, open_stream: OpenStream, on_reply: Callable[[Any], None],
                 on_broken: OnBroken, transport: Transport = GRPC) -> None:
        self._open_stream = open_stream
        self._on_reply = on_reply
        self._on_broken = on_broken
        self._transport = transport
        self._links: dict[str, StreamLink] = {}
        self._lock = threading.Lock()

    def send(self, address: str, message: Any) -> None:
        """Queue `message` for `address`, opening a link to it on first use."""
        with self._lock:
            link = self._links.get(address)
            if link is None:
                link = StreamLink(address, self._open_stream, self._on_reply, self._on_broken,
                                  self._transport)
                self._links[address] = link
        link.send(message)

    def close(self) -> None:
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()


class PortInUse(OSError):
    """Another process listens on the port already."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(errno.EADDRINUSE, f"port {port} on {host} is already in use")
        self.host = host
        self.port = port


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (IPv4) for a server to listen on; never shared with
    another process (SO_REUSEADDR only lets a restarted server past TIME_WAIT; without
    SO_REUSEPORT a second listener is refused). Raises PortInUse, or OSError."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(host, port) from None
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def start_server(services: pb_grpc.RingServicer | list[tuple[Callable[..., Any], Any]], host: str,
                 port: int, max_workers: int = 32) -> tuple[grpc.Server, int]:
    """Serve a Ring servicer (or (add_to_server, servicer) pairs) on host:port, exclusively;
    0 picks a free port. Returns (server, port); raises PortInUse, or OSError."""
    from concurrent import futures

    if port:
        listen_socket(host, port).close()  # the error names the cause, which grpc does not
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=SERVER_OPTIONS, interceptors=auth.server_interceptors())
    if not isinstance(services, list):
        services = [(pb_grpc.add_RingServicer_to_server, services)]
    for add_to_server, servicer in services:
        add_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # newer grpc raises instead of returning 0
        bound = 0
    if bound == 0:
        raise PortInUse(host, port)
    server.start()
    return server, bound
