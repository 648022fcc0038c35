"""Cluster-key authentication of every gRPC call: an HMAC with a timestamp and a nonce.

With a cluster key, each call carries `x-dnet-ts` (ms since the epoch), `x-dnet-nonce` and
`x-dnet-mac` = HMAC-SHA256(key-derived secret, method, ts, nonce). A server refuses calls
without a valid MAC, outside a clock window, or reusing a nonce it has seen, so a captured
call cannot be replayed; it logs each refusal with the caller's address. Streams are
authenticated when they open, gRPC's and the data plane's TCP streams (`dnet.ring.tcp`)
alike. Without a key, calls carry nothing and anyone on the network can join, as the seed's
design allows. The MAC authenticates; it does not encrypt.
Refusals are logged once per caller, method and kind, then at most once a minute with a count
(a peer with a skewed clock calls every second).

A process has one cluster key: `configure(key)` at start-up, then `channel(address)` and
`server_interceptors()` wherever channels and servers are made.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import grpc

from dnet.ratelimit import LogLimiter

log = logging.getLogger(__name__)

MAX_CLOCK_SKEW_S = 30.0
_TS, _NONCE, _MAC = "x-dnet-ts", "x-dnet-nonce", "x-dnet-mac"
_DOMAIN = b"dnet/grpc-auth/v1\0"


class RefusalKind(Enum):
    NO_SIGNATURE = "no cluster-key signature"
    BAD_SIGNATURE = "bad cluster-key signature"
    BAD_TIMESTAMP = "bad timestamp"
    CLOCK_SKEW = "clock skew"
    REPLAYED = "replayed call"


@dataclass(frozen=True)
class Refusal:
    """Why a call is refused: its kind, and the words for the log and the caller."""

    kind: RefusalKind
    message: str


class ClusterAuth:
    def __init__(self, key: str) -> None:
        self._secret = hashlib.sha256(_DOMAIN + key.encode()).digest()
        self._seen: dict[str, float] = {}
        self._order: collections.deque[tuple[float, str]] = collections.deque()
        self._lock = threading.Lock()

    def _mac(self, method: str, ts: str, nonce: str) -> str:
        message = f"{method}\n{ts}\n{nonce}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign(self, method: str) -> list[tuple[str, str]]:
        ts, nonce = str(int(time.time() * 1000)), secrets.token_hex(16)
        return [(_TS, ts), (_NONCE, nonce), (_MAC, self._mac(method, ts, nonce))]

    def verify(self, method: str, metadata: tuple[tuple[str, Any], ...]) -> Refusal | None:
        """None when the call is authentic, else why not."""
        values = {key: value for key, value in metadata if key in (_TS, _NONCE, _MAC)}
        if len(values) != 3:
            return _refusal(RefusalKind.NO_SIGNATURE)
        ts, nonce, mac = values[_TS], values[_NONCE], values[_MAC]
        if not hmac.compare_digest(self._mac(method, ts, nonce), mac):
            return _refusal(RefusalKind.BAD_SIGNATURE)
        try:
            age = time.time() - int(ts) / 1000
        except ValueError:
            return _refusal(RefusalKind.BAD_TIMESTAMP)
        if abs(age) > MAX_CLOCK_SKEW_S:
            side = "behind" if age > 0 else "ahead of"
            return Refusal(RefusalKind.CLOCK_SKEW,
                           f"the caller's clock is {abs(age):.0f} s {side} this node's "
                           f"(clocks must agree within {MAX_CLOCK_SKEW_S:.0f} s)")
        with self._lock:
            now = time.monotonic()
            while self._order and self._order[0][0] < now:
                self._seen.pop(self._order.popleft()[1], None)
            if nonce in self._seen:
                return _refusal(RefusalKind.REPLAYED)
            expiry = now + 2 * MAX_CLOCK_SKEW_S
            self._seen[nonce] = expiry
            self._order.append((expiry, nonce))
        return None


def _refusal(kind: RefusalKind) -> Refusal:
    return Refusal(kind, kind.value)


_auth: ClusterAuth | None = None


_key: str | None = None


def configure(key: str | None) -> None:
    global _auth, _key
    _auth = ClusterAuth(key) if key else None
    _key = key or None


def enabled() -> bool:
    return _auth is not None


def key() -> str | None:
    """The cluster key this process was configured with (None without one)."""
    return _key


def sign(method: str) -> list[tuple[str, str]]:
    """The signature metadata of a call or stream to `method`; empty without a cluster key."""
    return _auth.sign(method) if _auth is not None else []


def check(method: str, metadata: tuple[tuple[str, Any], ...]) -> Refusal | None:
    """None if a call or stream to `method` with `metadata` may proceed here (always, without
    a cluster key), else why not. The data plane's streams (`dnet.ring.tcp`) use this."""
    return _auth.verify(method, metadata) if _auth is not None else None


def refusal_log() -> LogLimiter:
    """Where refused calls are logged: once per caller, method and kind, then once a minute."""
    return LogLimiter(log)


# ----- client side ---------------------------------------------------------------------------


class _Details(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: list) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = getattr(details, "compression", None)


class _Signer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, auth: ClusterAuth) -> None:
        self._auth = auth

    def _signed(self, details: grpc.ClientCallDetails) -> _Details:
        return _Details(details, [*(details.metadata or []), *self._auth.sign(details.method)])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._signed(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._signed(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._signed(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._signed(details), requests)


def channel(address: str, options: list | None = None) -> grpc.Channel:
    """An insecure channel to `address`, signing every call when a cluster key is set."""
    from dnet.ring.links import CHANNEL_OPTIONS

    raw = grpc.insecure_channel(address, options=options or CHANNEL_OPTIONS)
    return grpc.intercept_channel(raw, _Signer(_auth)) if _auth is not None else raw


# ----- server side ---------------------------------------------------------------------------


def peer_host(peer: str) -> str:
    """The caller without its (ephemeral) port: 'ipv4:10.0.0.5:53211' -> 'ipv4:10.0.0.5'."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class _Checker(grpc.ServerInterceptor):
    def __init__(self, auth: ClusterAuth) -> None:
        self._auth = auth
        self._refusals = refusal_log()

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        refusal = self._auth.verify(details.method, details.invocation_metadata)
        if refusal is None or handler is None:
            return handler

        def refuse(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
            caller = peer_host(context.peer())
            self._refusals.warning((details.method, caller, refusal.kind), "refused %s from %s: %s",
                                   details.method, caller, refusal.message)
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"{refusal.message}: this node needs the cluster key")

        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}
        return make[(handler.request_streaming, handler.response_streaming)](
            refuse, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def server_interceptors() -> list[grpc.ServerInterceptor]:
    return [_Checker(_auth)] if _auth is not None else []
