"""The TCP data plane (dnet/ring/tcp.py): frames arrive whole and in order, rejections come
back, a dead or restarted peer is noticed and reached again, and without the cluster key no
frame gets through."""

from __future__ import annotations

import json
import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring import auth, tcp
from dnet.ring.links import TCP, LinkPool, RingServer, StreamMethod, start_server

WAIT_S = 10.0
KEY = "data plane key"


class Recorder(pb_grpc.RingServicer):  # type: ignore[misc]
    """Records every frame; answers a frame whose request id starts with "bad" with a status."""

    def __init__(self) -> None:
        self.frames: queue.SimpleQueue[pb.Frame] = queue.SimpleQueue()
        self.tokens: queue.SimpleQueue[pb.Token] = queue.SimpleQueue()

    def Frames(self, request_iterator: Iterator[pb.Frame], context: Any) -> Iterator[Any]:  # noqa: N802
        for frame in request_iterator:
            self.frames.put(frame)
            if frame.request_id.startswith("bad"):
                yield pb.FrameStatus(request_id=frame.request_id, code=3, message="bad frame")

    def Tokens(self, request_iterator: Iterator[pb.Token], context: Any) -> Iterator[Any]:  # noqa: N802
        for token in request_iterator:
            self.tokens.put(token)
        return iter(())


@pytest.fixture
def served() -> Iterator[tuple[Recorder, str, RingServer]]:
    recorder = Recorder()
    server, port = start_server(recorder, "127.0.0.1", 0)
    try:
        yield recorder, f"127.0.0.1:{port}", server
    finally:
        server.stop(grace=None)


@pytest.fixture
def keyed() -> Iterator[None]:
    auth.configure(KEY)
    try:
        yield
    finally:
        auth.configure(None)


class Events:
    def __init__(self) -> None:
        self.replies: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.broken: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()

    def pool(self, method: StreamMethod = StreamMethod.FRAMES) -> LinkPool:
        return LinkPool(method, self.replies.put, lambda a, r: self.broken.put((a, r)), TCP)


def frame(request_id: str, position: int, payload: bytes = b"") -> pb.Frame:
    return pb.Frame(request_id=request_id, position=position,
                    hidden=pb.Tensor(shape=[len(payload)], dtype="float32", data=payload))


def test_frames_arrive_whole_and_in_order_and_rejections_come_back(served) -> None:
    recorder, address, _ = served
    events = Events()
    pool = events.pool()
    big = bytes(range(256)) * (40 * 1024)  # 10 MiB: more than a socket takes at once
    try:
        for i in range(200):
            pool.send(address, frame("r", i, big if i == 50 else b"x" * (i % 7)))
        pool.send(address, frame("bad-1", 0))
        got = [recorder.frames.get(timeout=WAIT_S) for _ in range(201)]
        status = events.replies.get(timeout=WAIT_S)
    finally:
        pool.close()
    assert [f.position for f in got[:200]] == list(range(200))
    assert got[50].hidden.data == big and got[51].hidden.data == b"x" * (51 % 7)
    assert status.request_id == "bad-1" and status.message == "bad frame"
    assert events.broken.empty()


def test_tokens_travel_on_their_own_stream(served) -> None:
    recorder, address, _ = served
    events = Events()
    pool = events.pool(StreamMethod.TOKENS)
    try:
        for i in range(5):
            pool.send(address, pb.Token(request_id="r", index=i, token=10 + i))
        assert [recorder.tokens.get(timeout=WAIT_S).token for _ in range(5)] == \
            [10, 11, 12, 13, 14]
    finally:
        pool.close()


def test_nothing_listening_is_reported_at_once() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    events = Events()
    pool = events.pool()
    started = time.monotonic()
    pool.send(address, frame("r", 0))  # never blocks, even though nobody listens
    assert time.monotonic() - started < 1.0
    where, reason = events.broken.get(timeout=WAIT_S)
    pool.close()
    assert where == address and "UNAVAILABLE" in reason


def test_a_stopped_peer_breaks_the_link_and_a_restarted_one_is_reached_again() -> None:
    first = Recorder()
    server, port = start_server(first, "127.0.0.1", 0)
    address = f"127.0.0.1:{port}"
    events = Events()
    pool = events.pool()
    try:
        pool.send(address, frame("r", 0))
        assert first.frames.get(timeout=WAIT_S).position == 0
        server.stop(grace=None).wait(timeout=WAIT_S)
        assert events.broken.get(timeout=WAIT_S)[0] == address
        # The node comes back on the same gRPC port; its data plane has a new port.
        second = Recorder()
        server, _ = start_server(second, "127.0.0.1", port)
        pool.send(address, frame("r", 1))
        assert second.frames.get(timeout=WAIT_S).position == 1
    finally:
        pool.close()
        server.stop(grace=None)


# ----- the cluster key: a stream is authenticated when it opens ----------------------------


def raw_stream(address: str, hello: dict[str, Any], frames: list[pb.Frame]) -> dict[str, Any]:
    """Open a data stream by hand: send `hello` and then `frames` at once, without waiting;
    return the server's answer to the hello."""
    port = tcp.DataPorts().port(address)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        for payload in [json.dumps(hello).encode()] + [f.SerializeToString() for f in frames]:
            sock.sendall(struct.pack(">I", len(payload)) + payload)
        with sock.makefile("rb") as reader:
            answer = tcp.read_message(reader)
    assert answer is not None
    return dict(json.loads(answer))


def test_a_keyed_data_plane_refuses_strangers_and_replays(served, keyed: None,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    recorder, address, _ = served
    method = StreamMethod.FRAMES.value
    unsigned = raw_stream(address, {"method": method}, [frame("intruder", 0)])
    wrong = raw_stream(address, {"method": method,
                                 "auth": auth.ClusterAuth("not the key").sign(method)},
                       [frame("intruder", 1)])
    signature = auth.ClusterAuth(KEY).sign(method)
    right = raw_stream(address, {"method": method, "auth": signature}, [frame("friend", 0)])
    replayed = raw_stream(address, {"method": method, "auth": signature}, [frame("intruder", 2)])
    assert [unsigned["ok"], wrong["ok"], right["ok"], replayed["ok"]] == [False, False, True, False]
    assert unsigned["code"] == "UNAUTHENTICATED" and "replayed" in replayed["message"]
    assert recorder.frames.get(timeout=WAIT_S).request_id == "friend"
    time.sleep(0.2)
    assert recorder.frames.empty()  # nothing sent behind a refused hello was taken
    assert f"refused {method}" in caplog.text and "replayed call" in caplog.text
    # A member with the key gets through as usual.
    events = Events()
    pool = events.pool()
    try:
        pool.send(address, frame("member", 0))
        assert recorder.frames.get(timeout=WAIT_S).request_id == "member"
    finally:
        pool.close()


def test_a_refused_stream_tells_its_owner_why(served) -> None:
    recorder, address, _ = served
    events = Events()
    stream = tcp.ClientStream(address, "/dnet.ring.v1.Ring/Nothing", pb.FrameStatus,
                              tcp.DataPorts(), events.replies.put,
                              lambda reason: events.broken.put(("", reason)))
    stream.send(frame("queued before the refusal", 0))
    _, reason = events.broken.get(timeout=WAIT_S)
    stream.close()
    assert reason.startswith("UNIMPLEMENTED")
    time.sleep(0.2)
    assert recorder.frames.empty()


def test_an_oversized_message_ends_the_stream(served) -> None:
    recorder, address, _ = served
    port = tcp.DataPorts().port(address)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        hello = json.dumps({"method": StreamMethod.FRAMES.value}).encode()
        sock.sendall(struct.pack(">I", len(hello)) + hello)
        sock.sendall(struct.pack(">I", tcp.MAX_MESSAGE_BYTES + 1))
        with sock.makefile("rb") as reader:
            assert json.loads(tcp.read_message(reader) or b"{}")["ok"]
            assert tcp.read_message(reader) is None  # the server closed the stream
    assert recorder.frames.empty()


def test_a_closed_link_sends_nothing_more(served) -> None:
    recorder, address, _ = served
    events = Events()
    pool = events.pool()
    pool.send(address, frame("r", 0))
    assert recorder.frames.get(timeout=WAIT_S).position == 0
    pool.close()
    done = threading.Event()
    threading.Timer(0.3, done.set).start()
    done.wait()
    assert events.broken.empty()  # closing is not a break
