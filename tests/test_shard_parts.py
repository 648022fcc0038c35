"""The shard runtime's parts, each built with fakes: its tables, its train caches, and the
runtime itself over a stand-in model and an in-memory network (no weights, no sockets)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring import frames
from dnet.ring.frames import FrameRejected, Opening, RequestStep, Status, TrainStep
from dnet.ring.memory import MemoryNetwork
from dnet.shard.requests import (
    ActiveRequest,
    InTrain,
    KvReservations,
    OwnCaches,
    RequestIds,
    RequestTable,
    TrainCaches,
)
from dnet.shard.router import MeshRouter
from dnet.shard.runtime import ShardRuntime
from dnet.shard.service import ShardService
from dnet.shard.trains import TrainScheduler
from dnet.stage import contiguous_runs
from tests.inprocess import wait_for

# ----- tables ---------------------------------------------------------------------------


def opening(request_id: str) -> RequestStep:
    return RequestStep(request_id, 0, 0, (1,), None, False, "", "", 0,
                       Opening(pb.SamplingParams()))


def later(request_id: str) -> RequestStep:
    return RequestStep(request_id, 0, 5, (1,), None, True, "", "", 0, None)


def test_request_ids_drop_late_steps_of_released_requests_and_refuse_unknown_ones() -> None:
    ids = RequestIds(tombstone_ttl_s=10.0)
    with pytest.raises(FrameRejected) as caught:
        ids.admit(later("a"))
    assert caught.value.code is Status.NOT_FOUND
    assert ids.admit(opening("a")) and ids.admit(later("a"))
    ids.release("a", now=100.0)
    assert not ids.admit(opening("a"))  # a late first step must not reopen it
    assert ids.admit(later("a"))  # queued; the compute thread finds no request and drops it
    assert ids.oldest_release() == 100.0
    ids.prune(now=105.0)
    assert ids.oldest_release() == 100.0
    ids.prune(now=110.5)  # the tombstone is gone: the id is unknown again
    assert ids.oldest_release() is None
    with pytest.raises(FrameRejected):
        ids.admit(TrainStep("t", 0, ("a",), (5,), (1,), None, "", 0))


def request(entry: str = "e", sent_to: tuple[str, ...] = ()) -> ActiveRequest:
    return ActiveRequest(entry=entry, head="h", epoch=0, kv=OwnCaches({}), tail=None,
                         sent_to=set(sent_to))


def test_the_request_table_knows_who_is_idle_and_where_each_request_went() -> None:
    table = RequestTable()
    table.open("a", request("e1", ("s1",)), now=1.0)
    table.open("b", request("e2", ("s1", "s2")), now=2.0)
    table.open("c", request("e1"), now=3.0)
    assert table.oldest_use() == 1.0
    table.touch(("a",), now=4.0)
    assert table.oldest_use() == 2.0
    assert table.expired(now=5.5, ttl_s=3.0) == ["b"]
    assert table.sent_to("s1") == ["a", "b"] and table.sent_to("s2") == ["b"]
    assert table.from_entry("e1") == ["a", "c"]
    assert table.pop("b") is not None and table.pop("b") is None
    assert len(table) == 2 and list(table) == ["a", "c"]


def test_kv_reservations_refuse_past_the_cap_and_free_on_release() -> None:
    kv = KvReservations(cap_bytes=100)
    assert kv.reserve("a", 60) is None
    refusal = kv.reserve("b", 50)
    assert refusal is not None and refusal.reserved == 60
    assert kv.reserved_bytes == 60
    kv.release("a")
    assert kv.reserve("b", 50) is None and kv.reserved_bytes == 50
    assert KvReservations(cap_bytes=None).reserve("x", 10**12) is None


def own_caches(prompt: int) -> dict[int, KVCache]:
    caches = {0: KVCache()}
    caches[0].update_and_fetch(mx.zeros((1, 1, prompt, 4)), mx.zeros((1, 1, prompt, 4)))
    return caches


def train(train_id: str, members: tuple[str, ...]) -> TrainStep:
    return TrainStep(train_id, 0, members, tuple(5 for _ in members),
                     tuple(1 for _ in members), None, "h", 0)


def test_requests_join_a_trains_batch_caches_once_and_for_good() -> None:
    caches = TrainCaches()
    a, b = request(), request()
    a.kv, b.kv = OwnCaches(own_caches(3)), OwnCaches(own_caches(5))
    merged = caches.for_step(train("t", ("a", "b")), ("a", "b"), [a, b])
    assert a.kv == InTrain("t") and b.kv == InTrain("t")
    assert merged[0].keys.shape[0] == 2 and caches.members("t") == ["a", "b"]
    with pytest.raises(RuntimeError, match="rides train t"):
        caches.for_step(later("a"), ("a",), [a])  # a lone step cannot use train caches
    with pytest.raises(RuntimeError, match="not u"):
        caches.for_step(train("u", ("a",)), ("a",), [a])
    caches.leave("a", a)
    assert caches.members("t") == ["b"]
    caches.leave("b", b)
    assert caches.members("t") == []


def test_train_ids_come_from_the_scheduler_s_id_source() -> None:
    counter = iter(range(100))
    trains = TrainScheduler(max_trains=1, new_id=lambda: f"train-{next(counter)}")
    trains.ready("a")
    trains.ready("b")
    [dispatch] = trains.passed("a", ["a"])
    assert dispatch.train_id == "train-0" and dispatch.members == ("a", "b")
    trains.count_stages(3)
    assert trains.max_trains == 3
    trains.reset_stages()
    assert trains.max_trains == 1


# ----- the runtime over a stand-in model ---------------------------------------------------

VOCAB = 32


class FakeCache:
    def __init__(self) -> None:
        self.offset = 0

    @property
    def state(self) -> mx.array:
        return mx.array([self.offset])


class CountingStage:
    """A stand-in for `Stage` whose model answers every token with the next one (mod VOCAB):
    hidden states are one-hot rows, each layer leaves them alone and counts the tokens in its
    cache, and the logits put the highest score on the last token plus one."""

    def __init__(self, layers: list[int], num_layers: int = 4) -> None:
        self.layers = sorted(layers)
        self.num_layers = num_layers
        self.runs = contiguous_runs(self.layers)
        self._ends = {i: end for start, end in self.runs for i in range(start, end)}
        self.holds_embedding = 0 in self.layers
        self.holds_head = num_layers - 1 in self.layers
        self.hidden_size = VOCAB
        self.config = {"vocab_size": VOCAB}
        self.cache_templates: list = []  # every cache batches exactly
        self.model_dir = Path("/nonexistent")  # no grammar is asked of this stage
        self.window = len(self.layers)
        self.closed = False

    def kv_bytes(self, tokens: int) -> int:
        return 10 * tokens

    def new_caches(self) -> dict[int, FakeCache]:
        return {i: FakeCache() for i in self.layers}

    def embed(self, tokens: mx.array) -> mx.array:
        return (tokens[..., None] == mx.arange(VOCAB)).astype(mx.float32)

    def forward(self, h: mx.array, start: int, caches: dict) -> tuple[mx.array, int]:
        end = self._ends[start]
        for i in range(start, end):
            caches[i].offset += h.shape[1]
        return h, end

    def logits(self, h: mx.array) -> mx.array:
        return mx.roll(h[:, -1, :], 1, axis=-1) * 10

    def close(self) -> None:
        self.closed = True


class TokenSink(pb_grpc.RingServicer):
    def __init__(self) -> None:
        self.tokens: list[pb.Token] = []
        self.arrived = threading.Condition()

    def Tokens(self, request_iterator: Iterator[pb.Token], context) -> Iterator[pb.Empty]:
        for token in request_iterator:
            with self.arrived:
                self.tokens.append(token)
                self.arrived.notify_all()
        return iter(())

    def wait(self, count: int) -> list[pb.Token]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.tokens) >= count, timeout=10)
            return list(self.tokens)


@pytest.fixture
def shards():
    """Start fake-model runtimes on layer lists of a 4-layer model, wired in memory."""
    network = MemoryNetwork()
    sink = TokenSink()
    network.serve("entry", sink)
    runtimes: list[ShardRuntime] = []

    def start(layer_lists: list[list[int]], **options) -> list[ShardRuntime]:
        owners = {layer: f"s{i}" for i, layers in enumerate(layer_lists) for layer in layers}
        for i, layers in enumerate(layer_lists):
            runtime = ShardRuntime(lambda layers=layers: CountingStage(layers),
                                   MeshRouter(owners), model_name="fake", transport=network,
                                   **options)
            runtime.start()
            network.serve(f"s{i}", ShardService(runtime))
            runtimes.append(runtime)
        return runtimes

    yield start, network, sink
    for runtime in runtimes:
        runtime.stop()


def first_frame(request_id: str, prompt: list[int], max_tokens: int,
                eos: tuple[int, ...] = ()) -> pb.Frame:
    sampling = pb.SamplingParams(max_tokens=max_tokens, max_context=len(prompt) + max_tokens,
                                 eos_token_ids=eos)
    return frames.to_wire(RequestStep(request_id, 0, 0, tuple(prompt), None, True, "entry",
                                      "s0", 0, Opening(sampling)))


@pytest.mark.parametrize("layer_lists", [[[0, 1, 2, 3]], [[0, 1], [2, 3]], [[0, 3], [1, 2]]])
def test_the_tail_counts_on_until_max_tokens_then_every_shard_lets_go(shards,
                                                                      layer_lists) -> None:
    start, network, sink = shards
    runtimes = start(layer_lists)
    network.call("s0", "Forward", first_frame("r", [3, 4, 5], max_tokens=6))
    tokens = sink.wait(6)
    assert [t.token for t in tokens] == [6, 7, 8, 9, 10, 11]
    assert [t.index for t in tokens] == list(range(6))
    assert [t.finish_reason for t in tokens] == [""] * 5 + ["length"]
    for runtime in runtimes:  # the entry releases; here we do, from the head
        wait_for(lambda r=runtime: r.active_requests == 1, 5, "the request is open")
    runtimes[0].release("r", propagate=True, head="s0")
    wait_for(lambda: all(r.active_requests == 0 for r in runtimes), 5, "every shard let go")


def test_an_end_of_sequence_token_stops_the_request(shards) -> None:
    start, network, sink = shards
    start([[0, 1, 2, 3]])
    network.call("s0", "Forward", first_frame("r", [3], max_tokens=50, eos=(6,)))
    assert [(t.token, t.finish_reason) for t in sink.wait(3)] == [(4, ""), (5, ""), (6, "stop")]


def test_a_request_past_the_kv_cap_is_refused_with_503(shards) -> None:
    start, network, sink = shards
    runtimes = start([[0, 1], [2, 3]], kv_cap_bytes=50)  # 10 bytes per token here
    network.call("s0", "Forward", first_frame("r", [3, 4, 5], max_tokens=6))
    [token] = sink.wait(1)
    assert token.error_code == 503 and "KV cache full" in token.error
    assert all(r.active_requests == 0 and r.kv_reserved_bytes == 0 for r in runtimes)


def test_a_dead_next_shard_fails_the_request_with_503(shards) -> None:
    start, network, sink = shards
    runtimes = start([[0, 1], [2, 3]])
    network.kill("s1")
    runtimes[1].stop()
    network.call("s0", "Forward", first_frame("r", [3, 4], max_tokens=6))
    [token] = sink.wait(1)
    assert token.error_code == 503 and "unreachable" in token.error
    wait_for(lambda: runtimes[0].active_requests == 0, 5, "the head dropped the request")


def test_a_step_at_the_wrong_position_fails_its_request(shards) -> None:
    start, network, sink = shards
    [runtime] = start([[0, 1, 2, 3]])
    prefill = frames.to_wire(RequestStep("r", 0, 0, (3, 4), None, False, "entry", "s0", 0,
                                         Opening(pb.SamplingParams(max_tokens=5))))
    network.call("s0", "Forward", prefill)
    network.call("s0", "Forward", frames.to_wire(RequestStep("r", 0, 7, (5,), None, True,
                                                             "entry", "s0", 0, None)))
    [token] = sink.wait(1)
    assert token.error_code == 500 and "expects 2" in token.error
    wait_for(lambda: runtime.active_requests == 0, 5, "the request is dropped")


def test_stopping_a_runtime_closes_its_stage_once(shards) -> None:
    start, _, _ = shards
    [runtime] = start([[0, 1, 2, 3]])
    stage = runtime.stage
    runtime.stop()
    runtime.stop()
    assert stage.closed


def test_a_step_runner_says_what_to_send_without_sending_it() -> None:
    from dnet.shard.steps import Dropped, Filled, Forward, Refused, StepRunner
    from dnet.shard.tail import Tail, TailOutput

    def runner(layers: list[int], cap: int | None = None) -> tuple[StepRunner, RequestTable]:
        stage = CountingStage(layers)
        table = RequestTable()
        tail = Tail(stage, table) if stage.holds_head else None
        return StepRunner(stage, table, TrainCaches(), KvReservations(cap), tail,
                          VOCAB, "me", lambda: 0.0), table

    def first(request_id: str, sample: bool, max_tokens: int = 4) -> RequestStep:
        sampling = pb.SamplingParams(max_tokens=max_tokens, max_context=2 + max_tokens)
        return RequestStep(request_id, 0, 0, (3, 4), None, sample, "entry", "h", 0,
                           Opening(sampling))

    head, table = runner([0, 1])
    outcome = head.run(first("a", sample=True))
    assert isinstance(outcome, Forward) and outcome.step.layer == 2
    assert isinstance(outcome.step, RequestStep) and outcome.step.opening is not None
    assert outcome.step.opening.route == ("me",) and outcome.step.hidden is not None
    table.pop("a")
    assert isinstance(head.run(later("a")), Dropped)  # released while it waited

    whole, _ = runner([0, 1, 2, 3])
    assert isinstance(whole.run(first("p", sample=False)), Filled)  # a prompt chunk
    out = whole.run(first("s", sample=True))
    assert isinstance(out, TailOutput)
    [(entry, token)] = out.tokens
    assert (entry, token.token, token.index) == ("entry", 5, 0)
    [next_step] = out.steps  # the next decode step, for the head
    assert isinstance(next_step, RequestStep)
    assert (next_step.position, next_step.tokens, next_step.layer) == (2, (5,), 0)

    full, _ = runner([0, 1, 2, 3], cap=30)  # 10 bytes a token here; this one needs 60
    refused = full.run(first("big", sample=True))
    assert isinstance(refused, Refused) and refused.refusal.need == 60
