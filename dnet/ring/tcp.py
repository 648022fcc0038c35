"""The data plane on plain TCP: one connection per link, length-prefixed protobuf messages.

Why not gRPC streams: on a busy shard a gRPC message passes four Python threads (the link's
request consumer, the channel's poller, the server's poller and a handler thread), each of
which must win the GIL from the compute thread; a hop cost 0.19 ms between two idle
processes and over 5 ms (Python's GIL switch interval) when the sender's compute thread was
busy. Here the sender's thread writes the message itself (a non-blocking `send`; a writer
thread takes over only when the socket's buffer is full) and one reader thread per
connection parses it and hands it to the servicer: 0.06 ms, busy or not (measured between
two network namespaces on one machine, see README "Performance").

Wire format, both ways: a 4-byte big-endian length, then that many bytes. The client's
first message is a hello, JSON `{"method": "/dnet.ring.v1.Ring/Frames", "auth": [[k, v],
...]}`, signed with the cluster key as a gRPC call to `method` is (`dnet.ring.auth`); the
server answers JSON `{"ok": true}`, or `{"ok": false, "code": ..., "message": ...}` and
closes. Then the client sends the method's requests (`Frame` or `Token`) and the server its
replies (`FrameStatus`, `Empty`), handled by the same servicer methods a gRPC stream calls.

A client finds a node's data port with a unary gRPC call (`DataPlane.Info`, authenticated
like every call) on the node's gRPC address, which stays the node's identity everywhere.
Connecting happens on a thread of its own, so `send` never waits for the network; a broken
connection (refused, reset, closed, or silent past the keepalive) is reported once through
`on_broken`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring import auth

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_HELLO_BYTES = 4096
CONNECT_TIMEOUT_S = 5.0
# A peer whose host vanished: unacknowledged data or silence fails the socket within seconds.
USER_TIMEOUT_MS = 5000
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 2, 1, 3
_LENGTH = struct.Struct(">I")

Handler = Callable[[Iterator[Any], Any], Iterator[Any]]


class StreamRefused(ConnectionError):
    """The server refused a stream's hello (e.g. UNAUTHENTICATED)."""


def tune(sock: socket.socket) -> None:
    """The data plane's socket options: no Nagle delay, keepalive, a user timeout."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPALIVE", KEEPALIVE_IDLE_S),
                        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT), ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS)):
        option = getattr(socket, name, None)  # Linux and macOS name some differently
        if option is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _packed(payload: bytes) -> bytes:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ValueError(f"a message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return _LENGTH.pack(len(payload)) + payload


def _read_exactly(reader: Any, size: int) -> bytes | None:
    data = reader.read(size)
    if len(data) < size:
        return None  # the peer closed the connection
    return bytes(data)


def read_message(reader: Any, limit: int = MAX_MESSAGE_BYTES) -> bytes | None:
    """The next message from a buffered socket reader; None at the end of the stream.
    Raises ConnectionError for a message over `limit` bytes."""
    header = _read_exactly(reader, _LENGTH.size)
    if header is None:
        return None
    (size,) = _LENGTH.unpack(header)
    if size > limit:
        raise ConnectionError(f"the peer sent a message of {size} bytes (limit {limit})")
    return _read_exactly(reader, size)


class Writer:
    """Writes messages to a socket in order without blocking its caller.

    While nothing is queued, `write` sends straight from the caller's thread (MSG_DONTWAIT);
    what the socket does not take at once goes to a queue a writer thread drains, and later
    messages queue behind it. Before `attach`, everything queues. A failed send calls
    `on_error` once; later writes are dropped (the owner reports the broken stream).
    """

    def __init__(self, name: str, on_error: Callable[[str], None]) -> None:
        self._name = name
        self._on_error = on_error
        self._sock: socket.socket | None = None
        self._queue: deque[memoryview] = deque()
        self._busy = False  # the writer thread holds a message it is sending
        self._failed = False
        self._closed = False
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self._queue:
                self._start()

    def write(self, payload: bytes) -> None:
        data = memoryview(_packed(payload))
        with self._lock:
            if self._failed or self._closed:
                return
            if self._sock is not None and not self._queue and not self._busy:
                try:
                    sent = self._sock.send(data, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    self._fail(str(exc))
                    return
                if sent == len(data):
                    return
                data = data[sent:]
            self._queue.append(data)
            if self._sock is not None:
                self._start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._lock.notify_all()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name=f"send-{self._name}",
                                            daemon=True)
            self._thread.start()
        self._lock.notify_all()

    def _fail(self, reason: str) -> None:
        if not self._failed:
            self._failed = True
            self._queue.clear()
            threading.Thread(target=self._on_error, args=(reason,), daemon=True).start()

    def _drain(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not (self._closed or self._failed):
                    self._lock.wait()
                if self._closed or self._failed:
                    return
                data = self._queue.popleft()
                self._busy = True
                sock = self._sock
            assert sock is not None
            try:
                sock.sendall(data)
            except OSError as exc:
                with self._lock:
                    self._busy = False
                    self._fail(str(exc))
                return
            with self._lock:
                self._busy = False


# ----- client side -----------------------------------------------------------------------


class DataPorts:
    """Each node's data port, asked of its gRPC server once and remembered."""

    def __init__(self) -> None:
        self._ports: dict[str, int] = {}
        self._lock = threading.Lock()

    def known(self, address: str) -> int | None:
        with self._lock:
            return self._ports.get(address)

    def port(self, address: str) -> int:
        """The data port of the node at `address` (host:grpc-port); raises ConnectionError."""
        known = self.known(address)
        if known is not None:
            return known
        try:
            with auth.channel(address) as channel:
                info = pb_grpc.DataPlaneStub(channel).Info(pb.Empty(), timeout=CONNECT_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise ConnectionError(f"{exc.code().name}: {exc.details()}") from None
        with self._lock:
            self._ports[address] = info.port
        return int(info.port)

    def forget(self, address: str) -> None:
        """The node may have restarted on another port: ask again next time."""
        with self._lock:
            self._ports.pop(address, None)


class ClientStream:
    """One link's stream to `address`: `send` queues or writes at once, replies go to
    `on_reply`, and a broken connection is reported once to `on_broken(reason)`."""

    def __init__(self, address: str, method: str, reply_type: Any, ports: DataPorts,
                 on_reply: Callable[[Any], None], on_broken: Callable[[str], None]) -> None:
        self._address = address
        self._method = method
        self._reply_type = reply_type
        self._ports = ports
        self._on_reply = on_reply
        self._on_broken = on_broken
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._ended = False  # broken or closed: report nothing more
        self._writer = Writer(address, self._broken)
        threading.Thread(target=self._run, name=f"link-{address}", daemon=True).start()

    def send(self, message: Any) -> None:
        self._writer.write(message.SerializeToString())

    def close(self) -> None:
        with self._lock:
            self._ended = True
            sock = self._sock
        self._writer.close()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _broken(self, reason: str) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        self._writer.close()
        self._on_broken(reason)

    def _connect(self) -> socket.socket:
        host = self._address.rsplit(":", 1)[0]
        # A remembered port may be stale (the node restarted): then ask again, once.
        for retry in (self._ports.known(self._address) is not None, False):
            try:
                port = self._ports.port(self._address)
                sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
                break
            except OSError as exc:
                self._ports.forget(self._address)
                if not retry:
                    raise ConnectionError(f"UNAVAILABLE: {exc}") from None
        sock.settimeout(None)
        tune(sock)
        hello = {"method": self._method,
                 "auth": auth.sign(self._method)}
        sock.sendall(_packed(json.dumps(hello).encode()))
        return sock

    def _run(self) -> None:
        try:
            sock = self._connect()
        except (ConnectionError, OSError) as exc:
            self._broken(str(exc))
            return
        with self._lock:
            if self._ended:
                sock.close()
                return
            self._sock = sock
        reason = "the peer closed the stream"
        try:
            with sock, sock.makefile("rb") as reader:
                answer = read_message(reader, MAX_HELLO_BYTES)
                if answer is None:
                    raise ConnectionError("UNAVAILABLE: the peer closed the stream at once")
                verdict = json.loads(answer)
                if not verdict.get("ok"):
                    raise StreamRefused(f"{verdict.get('code')}: {verdict.get('message')}")
                # Only now: nothing is sent on a stream the server has not accepted.
                self._writer.attach(sock)
                while (payload := read_message(reader)) is not None:
                    self._on_reply(self._reply_type.FromString(payload))
        except (OSError, ValueError) as exc:  # ConnectionError and JSON errors included
            reason = str(exc) or type(exc).__name__
        self._broken(reason)


# ----- server side -----------------------------------------------------------------------


class _Aborted(Exception):
    pass


class ServicerContext:
    """The little of grpc.ServicerContext that dnet's servicers use, outside gRPC: the peer,
    and `abort`, which raises `error(code, details)`."""

    def __init__(self, peer: str, error: Callable[[grpc.StatusCode, str], Exception]) -> None:
        self._peer = peer
        self._error = error

    def peer(self) -> str:
        return self._peer

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise self._error(code, details)


def _aborted(code: grpc.StatusCode, details: str) -> _Aborted:
    return _Aborted(f"{code.name}: {details}")


class DataListener:
    """Serves the streaming methods of a Ring servicer on `host`, on a port of its own.

    `methods` maps a method name to (handler, request type); `close` stops listening and
    breaks every open stream, as a stopped gRPC server does.
    """

    def __init__(self, host: str, methods: dict[str, tuple[Handler, Any]]) -> None:
        self._methods = methods
        self._listener = socket.create_server((host, 0), reuse_port=False)
        self.port: int = self._listener.getsockname()[1]
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._refusals = auth.refusal_log()
        threading.Thread(target=self._accept, name=f"data-{host}:{self.port}",
                         daemon=True).start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._connections.add(sock)
            threading.Thread(target=self._serve, args=(sock, f"ipv4:{peer[0]}:{peer[1]}"),
                             name=f"data-peer-{peer[0]}:{peer[1]}", daemon=True).start()

    def _serve(self, sock: socket.socket, peer: str) -> None:
        tune(sock)
        writer = Writer(peer, lambda reason: log.debug("reply to %s failed: %s", peer, reason))
        try:
            with sock, sock.makefile("rb") as reader:
                found = self._handshake(reader, sock, peer)
                if found is None:
                    return
                handler, request_type = found
                writer.attach(sock)
                context = ServicerContext(peer, _aborted)
                for reply in handler(self._requests(reader, request_type), context):
                    writer.write(reply.SerializeToString())
        except (OSError, ValueError, _Aborted) as exc:  # a broken or malformed stream
            log.debug("data stream from %s ended: %s", peer, exc)
        finally:
            writer.close()
            with self._lock:
                self._connections.discard(sock)

    def _handshake(self, reader: Any, sock: socket.socket,
                   peer: str) -> tuple[Handler, Any] | None:
        """The handler a valid hello asks for; None (after telling the client) otherwise."""
        payload = read_message(reader, MAX_HELLO_BYTES)
        hello = json.loads(payload) if payload is not None else None
        if not isinstance(hello, dict):
            return None
        method = str(hello.get("method", ""))
        found = self._methods.get(method)
        code, message = "UNIMPLEMENTED", f"no stream method {method!r}"
        if found is not None:
            metadata = tuple((str(k), str(v)) for k, v in hello.get("auth") or [])
            denied = auth.check(method, metadata)
            if denied is None:
                sock.sendall(_packed(b'{"ok": true}'))
                return found
            caller = auth.peer_host(peer)
            self._refusals.warning((method, caller, denied.kind), "refused %s from %s: %s",
                                   method, caller, denied.message)
            code, message = "UNAUTHENTICATED", f"{denied.message}: this node needs the cluster key"
        sock.sendall(_packed(json.dumps({"ok": False, "code": code,
                                         "message": message}).encode()))
        return None

    @staticmethod
    def _requests(reader: Any, request_type: Any) -> Iterator[Any]:
        while (payload := read_message(reader)) is not None:
            yield request_type.FromString(payload)
