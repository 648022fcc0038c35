"""The entry against a scripted head shard (a fake, in memory): what it sends, what it emits,
how it fails, replays, pauses and drains. No model, no sockets."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from dnet.entry import EntryService, Inflight, RingEntry, RingError, Timeouts
from dnet.entry.decisions import RingView
from dnet.entry.inflight import RingGate, within
from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring import frames
from dnet.ring.memory import MemoryNetwork
from tests.inprocess import wait_for

ENTRY = "entry"


class ScriptedHead(pb_grpc.RingServicer):
    """A head shard that records frames and answers each sampled one with `answer(frame)`."""

    def __init__(self, entry: Callable[[], RingEntry],
                 answer: Callable[[pb.Frame], list[pb.Token]]) -> None:
        self.frames: list[pb.Frame] = []
        self._entry = entry
        self._answer = answer

    def Frames(self, request_iterator: Iterator[pb.Frame], context) -> Iterator[pb.FrameStatus]:
        for frame in request_iterator:
            self.frames.append(frame)
            if frame.kind == pb.LOOKUP:  # no prefix cache here
                self._entry().deliver(frames.lookup_reply(frame.request_id, 0))
            if frame.kind == pb.ACTIVATION and frame.sample:
                for token in self._answer(frame):
                    self._entry().deliver(token)
        return iter(())

    def released(self) -> list[str]:
        return [f.request_id for f in self.frames if f.kind == pb.RELEASE]


def counting(n: int) -> Callable[[pb.Frame], list[pb.Token]]:
    """Answer with tokens 100, 101, ... up to n of them, the last one finishing."""
    def answer(frame: pb.Frame) -> list[pb.Token]:
        return [frames.token(frame.request_id, i, 100 + i,
                             finish=frames.FinishReason.LENGTH if i == n - 1
                             else frames.FinishReason.NONE) for i in range(n)]
    return answer


def make(answer: Callable[[pb.Frame], list[pb.Token]], **options) -> tuple[
        RingEntry, ScriptedHead, MemoryNetwork]:
    network = MemoryNetwork()
    holder: list[RingEntry] = []
    head = ScriptedHead(lambda: holder[0], answer)
    network.serve("head", head)
    entry = RingEntry("head", address=ENTRY, transport=network, **options)
    holder.append(entry)
    return entry, head, network


async def collect(entry: RingEntry, prompt: list[int], max_tokens: int = 5) -> list[pb.Token]:
    params = pb.SamplingParams(max_tokens=max_tokens, max_context=len(prompt) + max_tokens)
    return [t async for t in entry.generate(prompt, params)]


def test_a_prompt_goes_as_chunks_then_one_sampled_token_and_is_released() -> None:
    entry, head, _ = make(counting(3), prefill_chunk=4)
    tokens = asyncio.run(collect(entry, list(range(1, 11))))
    assert [t.token for t in tokens] == [100, 101, 102]
    assert [t.index for t in tokens] == [0, 1, 2]
    steps = [f for f in head.frames if f.kind == pb.ACTIVATION]
    assert [list(f.tokens) for f in steps] == [[1, 2, 3, 4], [5, 6, 7, 8], [9], [10]]
    assert [f.position for f in steps] == [0, 4, 8, 9]
    assert [f.sample for f in steps] == [False, False, False, True]
    assert all(f.entry == ENTRY and f.head == "head" for f in steps)
    wait_for(lambda: head.released() == [steps[0].request_id], 10, "the release arrived")
    assert entry.active_requests == 0


def test_duplicates_are_dropped_and_errors_raise_with_their_status() -> None:
    def answer(frame: pb.Frame) -> list[pb.Token]:
        return [frames.token(frame.request_id, 0, 7), frames.token(frame.request_id, 0, 7),
                frames.failure(frame.request_id, 503, "a shard broke")]

    entry, head, _ = make(answer)

    async def run() -> tuple[list[int], RingError]:
        got: list[int] = []
        with pytest.raises(RingError) as caught:
            async for token in entry.generate([1, 2], pb.SamplingParams(max_tokens=5)):
                got.append(token.token)
        return got, caught.value

    got, error = asyncio.run(run())
    assert got == [7] and error.status == 503 and error.message == "a shard broke"
    wait_for(lambda: len(head.released()) == 1, 10, "the release arrived")  # however it ends


def test_no_first_token_in_time_is_504() -> None:
    entry, _, _ = make(lambda frame: [], timeouts=Timeouts(first_token_s=0.2))
    with pytest.raises(RingError) as caught:
        asyncio.run(collect(entry, [1, 2, 3]))
    assert caught.value.status == 504


def test_an_unreachable_head_is_503_at_once() -> None:
    entry, _, network = make(counting(3))
    network.kill("head")
    start = time.monotonic()
    with pytest.raises(RingError) as caught:
        asyncio.run(collect(entry, [1, 2, 3]))
    assert caught.value.status == 503 and "unreachable" in caught.value.message
    # From the broken stream, not after the 300 s wait for a first token.
    assert time.monotonic() - start < 60


def test_a_failed_request_is_replayed_on_the_next_epoch_without_repeating_tokens() -> None:
    calls: list[pb.Frame] = []

    def answer(frame: pb.Frame) -> list[pb.Token]:
        calls.append(frame)
        if len(calls) == 1:  # two tokens, then the ring breaks
            return [frames.token(frame.request_id, 0, 50), frames.token(frame.request_id, 1, 51),
                    frames.failure(frame.request_id, 503, "gone")]
        # The replay: the shards count from the replayed position.
        return [frames.token(frame.request_id, 0, 52),
                frames.token(frame.request_id, 1, 53, finish=frames.FinishReason.LENGTH)]

    entry, head, network = make(answer, recover=True)
    network.serve("head2", head)

    async def run() -> list[pb.Token]:
        source = entry.generate([1, 2, 3], pb.SamplingParams(max_tokens=4, seed=5))
        got = [await anext(source), await anext(source)]
        later = asyncio.create_task(anext(source))
        await asyncio.sleep(0.2)
        assert not later.done()  # waiting for a new ring
        entry.resume("head2", 1)  # the re-planned ring
        got.append(await later)
        got += [t async for t in source]
        return got

    got = asyncio.run(run())
    assert [(t.index, t.token) for t in got] == [(0, 50), (1, 51), (2, 52), (3, 53)]
    replay = [f for f in head.frames if f.kind == pb.ACTIVATION][-4:]
    assert [list(f.tokens) for f in replay] == [[1, 2], [3], [50], [51]]
    assert replay[0].epoch == 1 and replay[0].sampling.draws_done == 2
    assert replay[0].sampling.max_tokens == 2 and replay[0].request_id != calls[0].request_id


def test_without_recovery_a_failure_is_final() -> None:
    entry, _, _ = make(lambda f: [frames.failure(f.request_id, 503, "gone")])
    with pytest.raises(RingError) as caught:
        asyncio.run(collect(entry, [1]))
    assert caught.value.status == 503


def test_429_past_max_requests_and_503_without_a_sink() -> None:
    entry, _, _ = make(lambda frame: [], max_requests=0)
    with pytest.raises(RingError) as caught:
        asyncio.run(collect(entry, [1]))
    assert caught.value.status == 429
    deaf = RingEntry("head", address="", transport=MemoryNetwork())
    with pytest.raises(RingError) as caught:
        asyncio.run(collect(deaf, [1]))
    assert caught.value.status == 503


def test_drain_from_another_thread_waits_then_fails_the_rest() -> None:
    entry, _, _ = make(lambda frame: [frames.token(frame.request_id, 0, 9)])

    async def run() -> tuple[int, RingError]:
        source = entry.generate([1], pb.SamplingParams(max_tokens=100))
        await anext(source)  # the request is in flight, waiting for its next token
        started = time.monotonic()
        failed = await asyncio.to_thread(entry.drain, 0.3)
        assert time.monotonic() - started >= 0.25
        with pytest.raises(RingError) as caught:
            await anext(source)
        return failed, caught.value

    failed, error = asyncio.run(run())
    assert failed == 1 and error.status == 503


def test_the_token_sink_service_delivers_to_the_shared_table() -> None:
    inflight = Inflight()
    network = MemoryNetwork()
    network.serve(ENTRY, EntryService(inflight, "m"))
    holder: list[RingEntry] = []

    def answer(frame: pb.Frame) -> list[pb.Token]:
        # The tail streams tokens to the entry's sink over the network, as a shard would.
        connection = network.connect(ENTRY)
        list(connection.stub.Tokens(iter([frames.token(frame.request_id, 0, 42,
                                                       finish=frames.FinishReason.STOP)])))
        return []

    head = ScriptedHead(lambda: holder[0], answer)
    network.serve("head", head)
    entry = RingEntry("head", address=ENTRY, transport=network, inflight=inflight)
    holder.append(entry)
    assert [t.token for t in asyncio.run(collect(entry, [1, 2]))] == [42]
    assert network.call(ENTRY, "Health", pb.HealthRequest()).active_requests == 0


# ----- the gate: coroutines wait on events other threads set --------------------------------


def test_the_gate_wakes_waiters_from_another_thread_and_times_out() -> None:
    gate = RingGate(RingView("h", 0, admitting=False))

    async def run() -> tuple[RingView | None, RingView | None]:
        timer = threading.Timer(0.1, lambda: gate.set(RingView("h2", 3, admitting=True)))
        timer.start()
        woken = await gate.wait_for(lambda v: v.admitting, 10.0)
        missed = await gate.wait_for(lambda v: v.epoch > 3, 0.1)
        return woken, missed

    woken, missed = asyncio.run(run())
    assert woken == RingView("h2", 3, True) and missed is None


def test_a_cancelled_wait_stays_cancelled_when_its_token_arrives_at_the_same_moment() -> None:
    # A client leaves (the handler cancels) just as the next token lands: the request must
    # end, not generate on to its last token. asyncio.wait_for on Python 3.11 returns the
    # token here and the cancellation is lost.
    async def run() -> bool:
        tokens: asyncio.Queue[int] = asyncio.Queue()
        waiting = asyncio.ensure_future(within(tokens.get(), 10.0))
        await asyncio.sleep(0)  # it now waits on the queue
        tokens.put_nowait(7)
        waiting.cancel()
        try:
            await waiting
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(run()), "the cancellation was swallowed"
