"""A shard's gRPC service rejects bad frames with the right status and keeps serving.

Frames go straight to the shards of a two-shard ring (layers 0-3 and 4-7) over gRPC, as a
buggy or hostile peer would send them; after each, a chat request through the ring still
works. The ring runs in this process (`tests/inprocess.py`), on loopback gRPC and HTTP.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from dnet.local_ring import shard_health
from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring.links import start_server
from tests.conftest import wait_until
from tests.inprocess import InProcessRing

HIDDEN = 128  # the default generated model's hidden size
VOCAB = 512
LAYERS = [[0, 1, 2, 3], [4, 5, 6, 7]]
RPC_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def ring(qwen3_model: Path) -> Iterator[InProcessRing]:
    with InProcessRing(qwen3_model, LAYERS, grpc=True) as ring:
        ring.serve_http()
        yield ring


def stub(address: str) -> tuple[grpc.Channel, pb_grpc.RingStub]:
    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.RingStub(channel)


def forward(address: str, frame: pb.Frame) -> grpc.StatusCode:
    """Send one frame with the unary Forward call; returns the call's status code."""
    channel, ring_stub = stub(address)
    with channel:
        try:
            ring_stub.Forward(frame, timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def hidden(tokens: int, *, dtype: str = "float32", shape: list[int] | None = None,
           nbytes: int | None = None) -> pb.Tensor:
    shape = shape or [1, tokens, HIDDEN]
    width = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1}[dtype]
    size = int(np.prod(shape)) * width
    data = np.random.default_rng(0).standard_normal(size // 4 + 1).astype(np.float32)
    raw = (data.tobytes() * 2)[:size if nbytes is None else nbytes]
    return pb.Tensor(shape=shape, dtype=dtype, data=raw)


def new_id() -> str:
    return uuid.uuid4().hex



def active(address: str) -> int:
    reply = shard_health(address)
    return -1 if reply is None else reply.active_requests


def wait_no_caches(ring: InProcessRing, timeout_s: float = 15.0) -> None:
    for address in ring.shard_addresses:
        wait_until(lambda a=address: active(a) == 0, timeout_s,
                   f"shard {address} holds no KV cache")


def assert_ring_serves(ring: InProcessRing) -> None:
    response = httpx.post(f"{ring.url}/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "Still there?"}],
                                "max_tokens": 4})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


# (which shard, frame, expected status)
BAD_FRAMES: dict[str, tuple[int, Callable[[], pb.Frame], grpc.StatusCode]] = {
    "layer-not-held-by-head": (
        0, lambda: pb.Frame(request_id=new_id(), next_layer=5, tokens=[1], hidden=hidden(1)),
        grpc.StatusCode.FAILED_PRECONDITION),
    "layer-0-to-second-shard": (
        1, lambda: pb.Frame(request_id=new_id(), next_layer=0, tokens=[1, 2]),
        grpc.StatusCode.FAILED_PRECONDITION),
    "layer-past-the-model": (
        1, lambda: pb.Frame(request_id=new_id(), next_layer=8, tokens=[1], hidden=hidden(1)),
        grpc.StatusCode.FAILED_PRECONDITION),
    "negative-layer": (
        0, lambda: pb.Frame(request_id=new_id(), next_layer=-1, tokens=[1]),
        grpc.StatusCode.FAILED_PRECONDITION),
    "hidden-wrong-width": (
        1, lambda: pb.Frame(request_id=new_id(), next_layer=4, tokens=[1],
                            hidden=hidden(1, shape=[1, 1, HIDDEN // 2])),
        grpc.StatusCode.INVALID_ARGUMENT),
    "hidden-two-dimensional": (
        1, lambda: pb.Frame(request_id=new_id(), next_layer=4, tokens=[1],
                            hidden=hidden(1, shape=[1, HIDDEN])),
        grpc.StatusCode.INVALID_ARGUMENT),
    "hidden-batch-of-two": (
        1, lambda: pb.Frame(request_id=new_id(), next_layer=4, tokens=[1],
                            hidden=hidden(1, shape=[2, 1, HIDDEN])),
        grpc.StatusCode.INVALID_ARGUMENT),
    "hidden-rows-not-tokens": (
        1, lambda: pb.Frame(request_id=new_id(), next_layer=4, tokens=[1], hidden=hidden(3)),
        grpc.StatusCode.INVALID_ARGUMENT),
    "hidden-missing": (
        1, lambda: pb.Frame(request_id=new_id(), next_layer=4, tokens=[1]),
        grpc.StatusCode.INVALID_ARGUMENT),
    "dtype-int8": (
        1, lambda: pb.Frame(request_id=new_id(), next_layer=4, tokens=[1],
                            hidden=hidden(1, dtype="int8")),
        grpc.StatusCode.INVALID_ARGUMENT),
    "dtype-float64": (
        1, lambda: pb.Frame(request_id=new_id(), next_layer=4, tokens=[1],
                            hidden=hidden(1, dtype="float64")),
        grpc.StatusCode.INVALID_ARGUMENT),
    "truncated-bytes": (
        1, lambda: pb.Frame(request_id=new_id(), next_layer=4, tokens=[1, 2],
                            hidden=hidden(2, nbytes=2 * HIDDEN * 4 - 3)),
        grpc.StatusCode.INVALID_ARGUMENT),
    "too-many-bytes": (
        1, lambda: pb.Frame(request_id=new_id(), next_layer=4, tokens=[1],
                            hidden=hidden(1, nbytes=HIDDEN * 4 + 4)),
        grpc.StatusCode.INVALID_ARGUMENT),
    "unknown-request-at-head": (
        0, lambda: pb.Frame(request_id=new_id(), next_layer=0, position=7, tokens=[1]),
        grpc.StatusCode.NOT_FOUND),
    "unknown-request-mid-ring": (
        1, lambda: pb.Frame(request_id=new_id(), next_layer=4, position=7, tokens=[1],
                            hidden=hidden(1)),
        grpc.StatusCode.NOT_FOUND),
    "token-past-vocabulary": (
        0, lambda: pb.Frame(request_id=new_id(), next_layer=0, tokens=[1, 2, VOCAB]),
        grpc.StatusCode.INVALID_ARGUMENT),
    "token-huge": (
        0, lambda: pb.Frame(request_id=new_id(), next_layer=0, tokens=[2_000_000_000]),
        grpc.StatusCode.INVALID_ARGUMENT),
    "token-negative": (
        0, lambda: pb.Frame(request_id=new_id(), next_layer=0, tokens=[3, -1]),
        grpc.StatusCode.INVALID_ARGUMENT),
    "no-tokens": (
        0, lambda: pb.Frame(request_id=new_id(), next_layer=0),
        grpc.StatusCode.INVALID_ARGUMENT),
    "no-request-id": (
        0, lambda: pb.Frame(next_layer=0, tokens=[1, 2]),
        grpc.StatusCode.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_bad_frame_is_rejected_and_the_ring_still_serves(ring: InProcessRing, case: str) -> None:
    shard, make_frame, expected = BAD_FRAMES[case]
    assert forward(ring.shard_addresses[shard], make_frame()) == expected
    wait_no_caches(ring)  # a rejected frame opens no KV cache
    assert_ring_serves(ring)


def test_message_over_the_size_limit_is_resource_exhausted(ring: InProcessRing) -> None:
    size = 300 * 1024 * 1024  # over the 256 MiB limit
    rows = size // (HIDDEN * 4)
    frame = pb.Frame(request_id=new_id(), next_layer=4, tokens=[1] * rows,
                     hidden=pb.Tensor(shape=[1, rows, HIDDEN], dtype="float32",
                                      data=bytes(rows * HIDDEN * 4)))
    channel = grpc.insecure_channel(ring.shard_addresses[1],
                                    options=[("grpc.max_send_message_length", -1)])
    with channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.RingStub(channel).Forward(frame, timeout=60)
    del frame
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    wait_no_caches(ring)
    assert_ring_serves(ring)


def test_health_describes_each_shard(ring: InProcessRing) -> None:
    for address, layers in zip(ring.shard_addresses, LAYERS, strict=True):
        reply = shard_health(address)
        assert reply is not None
        assert reply.role == "shard"
        assert list(reply.layers) == layers
        assert reply.num_layers == 8
        assert reply.hidden_size == HIDDEN
        assert reply.model == ring.model


def test_frames_stream_reports_rejected_frames_and_stays_open(ring: InProcessRing) -> None:
    outbox: queue.Queue[pb.Frame | None] = queue.Queue()

    def requests() -> Iterator[pb.Frame]:
        while True:
            frame = outbox.get(timeout=RPC_TIMEOUT)  # raises (ending the call) if we stall
            if frame is None:
                return
            yield frame

    first_bad, second_bad = new_id(), new_id()
    channel, ring_stub = stub(ring.shard_addresses[0])
    with channel:
        replies = ring_stub.Frames(requests(), timeout=RPC_TIMEOUT)
        outbox.put(pb.Frame(request_id=first_bad, next_layer=6, tokens=[1], hidden=hidden(1)))
        status = next(replies)
        assert status.request_id == first_bad
        assert status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert status.message

        # A good frame is accepted silently; the stream carries on.
        outbox.put(pb.Frame(request_id=new_id(), kind=pb.RELEASE, next_layer=0))
        outbox.put(pb.Frame(request_id=second_bad, next_layer=0, tokens=[VOCAB + 5]))
        status = next(replies)
        assert status.request_id == second_bad, "the good frame got a status"
        assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]

        outbox.put(None)  # we are done: the stream ends cleanly, with no more statuses
        assert list(replies) == []
    wait_no_caches(ring)
    assert_ring_serves(ring)


def open_cache_frame(request_id: str, **fields) -> pb.Frame:
    """A prefill frame that opens a request's KV caches round the ring and never samples."""
    return pb.Frame(request_id=request_id, next_layer=0, position=0, tokens=[1, 2, 3],
                    sample=False, **fields)


def test_release_with_propagate_drops_the_cache_on_every_shard(ring: InProcessRing) -> None:
    wait_no_caches(ring)  # nothing else runs on the ring
    head, second = ring.shard_addresses
    request_id = new_id()
    assert forward(head, open_cache_frame(request_id, head=head)) == grpc.StatusCode.OK
    wait_until(lambda: active(head) == 1 and active(second) == 1, 15,
               "both shards hold the request's KV cache")

    channel, ring_stub = stub(head)
    with channel:
        ring_stub.Release(pb.ReleaseRequest(request_id=request_id, propagate=True),
                          timeout=RPC_TIMEOUT)
    wait_no_caches(ring)

    # A late frame of the released request must not open a cache that never ends.
    assert forward(head, pb.Frame(request_id=request_id, next_layer=0, position=3,
                                  tokens=[4], head=head)) in (grpc.StatusCode.OK,
                                                              grpc.StatusCode.NOT_FOUND)
    time.sleep(0.5)
    wait_no_caches(ring)
    assert_ring_serves(ring)


def test_release_of_an_unknown_request_is_harmless(ring: InProcessRing) -> None:
    channel, ring_stub = stub(ring.shard_addresses[0])
    with channel:
        ring_stub.Release(pb.ReleaseRequest(request_id=new_id(), propagate=True),
                          timeout=RPC_TIMEOUT)
    wait_no_caches(ring)
    assert_ring_serves(ring)


class TokenSink(pb_grpc.RingServicer):
    """A stand-in for an API's token sink, in this process, that we can make vanish."""

    def __init__(self) -> None:
        self.tokens: queue.Queue[pb.Token] = queue.Queue()

    def Tokens(self, request_iterator, context):  # noqa: N802 - the gRPC method's name
        for token in request_iterator:
            self.tokens.put(token)
        return iter(())


def test_caches_are_freed_when_the_entry_dies_mid_generation(ring: InProcessRing) -> None:
    wait_no_caches(ring)  # nothing else runs on the ring
    head = ring.shard_addresses[0]
    sink = TokenSink()
    server, port = start_server(sink, "127.0.0.1", 0)  # an entry's token sink, as dnet api's
    try:
        frame = pb.Frame(request_id=new_id(), next_layer=0, position=0, tokens=[1, 2, 3],
                         sample=True, entry=f"127.0.0.1:{port}", head=head,
                         sampling=pb.SamplingParams(max_tokens=100_000))
        assert forward(head, frame) == grpc.StatusCode.OK
        for _ in range(3):
            token = sink.tokens.get(timeout=RPC_TIMEOUT)
            assert token.request_id == frame.request_id and not token.error
        assert active(head) == 1 and active(ring.shard_addresses[1]) == 1
    finally:
        server.stop(grace=None).wait(timeout=10)  # the entry vanishes mid-generation
    # Nobody will ever read this request's tokens: it must not run on to max_tokens.
    wait_no_caches(ring)
    assert_ring_serves(ring)


def test_idle_kv_cache_is_dropped_after_the_ttl(qwen3_model: Path) -> None:
    # One shard alone (no API): it holds every layer, and a cache nobody releases.
    with InProcessRing(qwen3_model, [list(range(8))], grpc=True, kv_ttl_s=1) as ring:
        address = ring.shard_addresses[0]
        assert forward(address, open_cache_frame(new_id())) == grpc.StatusCode.OK
        wait_until(lambda: active(address) == 1, 10, "the shard holds the request's cache")
        wait_until(lambda: active(address) == 0, 10, "the idle cache is dropped")
