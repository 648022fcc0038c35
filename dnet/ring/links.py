"""Persistent streams to ring neighbours, over TCP or any other `Transport`.

A unary call per frame costs a round trip; a stream kept open per neighbour lets the sender
write and move on. A link notices a dead peer from the stream's error (at once when the
process dies, within a few seconds through keepalive when the host vanishes) and reports it,
so the owner can fail the requests it had sent that way instead of letting them hang; the
next message to that address opens a new stream.

Who is at the other end of an address is the `Transport`'s business: `TCP` dials the real
network's data plane (`dnet.ring.tcp`: one TCP connection per link, the sender's own thread
writing); `dnet.ring.memory.MemoryNetwork` connects to servicers in the same process. Shard
runtimes and entries take a transport as a constructor argument. Control traffic (health,
plans, releases) stays on gRPC.
"""

from __future__ import annotations

import enum
import errno
import logging
import socket
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any, Protocol

import grpc

from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring import auth, tcp

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = tcp.MAX_MESSAGE_BYTES
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


class StreamMethod(enum.Enum):
    """The Ring service's streaming methods, by their gRPC names (what the MAC signs)."""

    FRAMES = "/dnet.ring.v1.Ring/Frames"  # Frame in, FrameStatus (rejections) back
    TOKENS = "/dnet.ring.v1.Ring/Tokens"  # Token in, nothing back

    @property
    def handler_name(self) -> str:
        """The servicer method that handles it: `Frames` or `Tokens`."""
        return self.value.rsplit("/", 1)[1]


REQUEST_TYPES = {StreamMethod.FRAMES: pb.Frame, StreamMethod.TOKENS: pb.Token}
REPLY_TYPES = {StreamMethod.FRAMES: pb.FrameStatus, StreamMethod.TOKENS: pb.Empty}

OnReply = Callable[[Any], None]
OnBroken = Callable[[str, str], None]  # (address, reason)


class Stream(Protocol):
    def send(self, message: Any) -> None:
        """Queue or write `message`; never waits for the network. A broken stream drops it
        (its owner heard through `on_broken`)."""
        ...

    def close(self) -> None: ...


class Transport(Protocol):
    def open(self, address: str, method: StreamMethod, on_reply: OnReply,
             on_broken: Callable[[str], None]) -> Stream:
        """A stream of `method` to `address`; connecting is lazy, and a failure to connect
        or a broken stream is reported once through `on_broken(reason)`."""
        ...


class TcpTransport:
    """The real network: the data plane's authenticated TCP streams (`dnet.ring.tcp`)."""

    def __init__(self) -> None:
        self._ports = tcp.DataPorts()

    def open(self, address: str, method: StreamMethod, on_reply: OnReply,
             on_broken: Callable[[str], None]) -> Stream:
        return tcp.ClientStream(address, method.value, REPLY_TYPES[method], self._ports,
                                on_reply, on_broken)


TCP = TcpTransport()


class StreamLink:
    """One open stream to `address`; `send` never blocks on the network."""

    def __init__(self, address: str, method: StreamMethod, on_reply: OnReply,
                 on_broken: OnBroken, transport: Transport = TCP) -> None:
        self.address = address
        self._method = method
        self._on_reply = on_reply
        self._on_broken = on_broken
        self._transport = transport
        self._lock = threading.Lock()
        self._stream: Stream | None = None
        self._closed = False

    def send(self, message: Any) -> None:
        """Send `message` on the stream (opened on first use, and again after a break);
        raises ConnectionError once the link is closed. A broken stream is reported through
        `on_broken`, not here."""
        with self._lock:
            if self._closed:
                raise ConnectionError(f"link to {self.address} is closed")
            if self._stream is None:
                holder: list[Stream] = []
                self._stream = self._transport.open(
                    self.address, self._method, self._on_reply,
                    lambda reason: self._broken(holder, reason))
                holder.append(self._stream)
            # Under the lock: messages from several threads keep the order they were sent in.
            self._stream.send(message)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def _broken(self, holder: list[Stream], reason: str) -> None:
        with self._lock:
            if holder and self._stream is holder[0]:
                self._stream = None
            closed = self._closed
        if not closed:
            log.warning("link to %s broke: %s", self.address, reason)
            self._on_broken(self.address, reason)


class LinkPool:
    """One link per peer address, created on first use."""

    def __init__(self, method: StreamMethod, on_reply: OnReply, on_broken: OnBroken,
                 transport: Transport = TCP) -> None:
        self._method = method
        self._on_reply = on_reply
        self._on_broken = on_broken
        self._transport = transport
        self._links: dict[str, StreamLink] = {}
        self._lock = threading.Lock()

    def send(self, address: str, message: Any) -> None:
        """Send `message` to `address`, opening a link to it on first use."""
        with self._lock:
            link = self._links.get(address)
            if link is None:
                link = StreamLink(address, self._method, self._on_reply, self._on_broken,
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


class _DataPlaneInfo(pb_grpc.DataPlaneServicer):  # type: ignore[misc]  # generated untyped
    def __init__(self, port: int) -> None:
        self._port = port

    def Info(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.DataPlaneInfo:  # noqa: N802
        return pb.DataPlaneInfo(port=self._port)


class RingServer(grpc.Server):  # type: ignore[misc]  # grpc is untyped
    """A gRPC server and the TCP data plane of its Ring servicer, stopped together."""

    def __init__(self, server: grpc.Server, data: tcp.DataListener | None) -> None:
        self._server = server
        self._data = data

    @property
    def data_port(self) -> int | None:
        return self._data.port if self._data is not None else None

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_insecure_port(self, address: str) -> int:
        return int(self._server.add_insecure_port(address))

    def add_secure_port(self, address: str, credentials: Any) -> int:
        return int(self._server.add_secure_port(address, credentials))

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float | None) -> threading.Event:
        """Stop listening on both; open data streams break at once, gRPC calls get `grace`."""
        if self._data is not None:
            self._data.close()
        return self._server.stop(grace)  # type: ignore[no-any-return]

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(self._server.wait_for_termination(timeout))


def _data_listener(services: list[tuple[Callable[..., Any], Any]],
                   host: str) -> tcp.DataListener | None:
    """The data plane of the Ring servicer among `services`, if there is one."""
    ring = next((servicer for add, servicer in services
                 if add is pb_grpc.add_RingServicer_to_server), None)
    if ring is None:
        return None
    return tcp.DataListener(host, {
        method.value: (getattr(ring, method.handler_name), REQUEST_TYPES[method])
        for method in StreamMethod})


def start_server(services: pb_grpc.RingServicer | list[tuple[Callable[..., Any], Any]], host: str,
                 port: int, max_workers: int = 32) -> tuple[RingServer, int]:
    """Serve a Ring servicer (or (add_to_server, servicer) pairs) on host:port, exclusively;
    0 picks a free port. A Ring servicer's streams are also served on the TCP data plane
    (`dnet.ring.tcp`), on a free port of `host` that `DataPlane.Info` names. Returns
    (server, port); raises PortInUse, or OSError."""
    if port:
        listen_socket(host, port).close()  # the error names the cause, which grpc does not
    if not isinstance(services, list):
        services = [(pb_grpc.add_RingServicer_to_server, services)]
    data = _data_listener(services, host)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=SERVER_OPTIONS, interceptors=auth.server_interceptors())
    for add_to_server, servicer in services:
        add_to_server(servicer, server)
    if data is not None:
        pb_grpc.add_DataPlaneServicer_to_server(_DataPlaneInfo(data.port), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # newer grpc raises instead of returning 0
        bound = 0
    if bound == 0:
        if data is not None:
            data.close()
        raise PortInUse(host, port)
    server.start()
    return RingServer(server, data), bound
