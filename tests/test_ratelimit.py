"""Repeated identical warnings are rate-limited: the rule, and refused gRPC calls."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator

import grpc
import pytest

from dnet.entry import EntryService, Inflight
from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ratelimit import LogLimiter, should_log
from dnet.ring import auth
from dnet.ring.links import start_server

KEY = "the cluster key"
HEALTH = "/dnet.ring.v1.Ring/Health"


def test_the_first_is_logged_then_one_line_a_minute_with_a_count() -> None:
    seen: dict = {}
    seen, first = should_log(seen, "k", 0.0)
    assert first == 0
    for now in range(1, 60):
        seen, repeat = should_log(seen, "k", float(now))
        assert repeat is None
    seen, other = should_log(seen, "other", 30.0)
    assert other == 0, "another kind of warning is not held back"
    seen, summary = should_log(seen, "k", 60.0)
    assert summary == 59
    seen, repeat = should_log(seen, "k", 61.0)
    assert repeat is None


def test_the_limiter_logs_counts(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    limiter = LogLimiter(logging.getLogger("t"), interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t"):
        for step in range(25):
            now[0] = float(step)
            limiter.warning("k", "refused %s", "x")
    assert [r.getMessage() for r in caplog.records] == [
        "refused x", "refused x (9 more like it in the last 10 s)",
        "refused x (9 more like it in the last 10 s)"]


@pytest.fixture
def keyed_server() -> Iterator[str]:
    auth.configure(KEY)
    server, port = start_server(EntryService(Inflight(), "m"), "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)
        auth.configure(None)


def signed(ts_ms: int) -> list[tuple[str, str]]:
    signer = auth.ClusterAuth(KEY)
    nonce = secrets.token_hex(16)
    return [("x-dnet-ts", str(ts_ms)), ("x-dnet-nonce", nonce),
            ("x-dnet-mac", signer._mac(HEALTH, str(ts_ms), nonce))]


def call(address: str, metadata: list[tuple[str, str]] | None) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.RingStub(channel).Health(pb.HealthRequest(), timeout=5, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_a_peer_with_a_skewed_clock_is_logged_once_not_every_call(
        keyed_server: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dnet.ring.auth"):
        for _ in range(20):
            skewed = int((time.time() - 120) * 1000)  # two minutes behind
            assert call(keyed_server, signed(skewed)) == grpc.StatusCode.UNAUTHENTICATED
        for _ in range(5):
            assert call(keyed_server, None) == grpc.StatusCode.UNAUTHENTICATED
        assert call(keyed_server, signed(int(time.time() * 1000))) == grpc.StatusCode.OK
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 2, refused
    assert "clock is 120 s behind" in refused[0] or "clock is 121 s behind" in refused[0]
    assert "no cluster-key signature" in refused[1]
    assert "127.0.0.1" in refused[0]
