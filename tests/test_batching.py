"""Concurrent requests ride trains (batched decode steps) and keep their exact tokens."""

from __future__ import annotations

import threading

import httpx
import mlx.core as mx
import pytest
from mlx_lm.models.cache import RotatingKVCache

from dnet.shard.groups import batchable
from dnet.shard.requests import RequestTable
from dnet.shard.tail import Tail
from dnet.shard.trains import TrainScheduler
from dnet.stage import Stage
from tests.conftest import FLOAT_SPECS, QUANT_SPECS, QWEN3_BF16, QWEN3_Q4, reference_tokens

# ----- the scheduler: pure decisions ------------------------------------------------------


def test_requests_start_trains_up_to_the_number_of_stages_then_board_evenly() -> None:
    trains = TrainScheduler(max_trains=2)
    assert [d.members for d in trains.ready("a")] == [("a",)]
    assert [d.members for d in trains.ready("b")] == [("b",)]
    assert trains.ready("c") == [] and trains.ready("d") == []  # they wait at the tail
    # Four requests on two stages: a train takes waiting ones up to half of them, not all.
    first = trains.passed("a", ["a"])
    assert len(first) == 1 and first[0].batched and first[0].members == ("a", "c")
    second = trains.passed("b", ["b"])
    assert second[0].batched and second[0].members == ("b", "d")
    # The batch keeps its id while its members change; finished ones leave.
    again = trains.passed(first[0].train_id, ["a"])
    assert again[0].train_id == first[0].train_id and again[0].members == ("a",)
    assert trains.passed(first[0].train_id, []) == []
    assert set(trains.trains) == {second[0].train_id}


def test_a_train_that_ends_makes_room_for_waiting_requests() -> None:
    trains = TrainScheduler(max_trains=2)
    trains.ready("a")
    trains.ready("b")
    for waiting in "cdef":
        trains.ready(waiting)
    # a finishes while four wait: a new train leaves with its fair share of the five.
    [started] = trains.passed("a", [])
    assert started.members == ("c", "d", "e") and started.batched
    [b] = trains.passed("b", ["b"])
    assert b.members == ("b", "f")


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("requests", [1, 2, 3, 5, 8, 16, 33])
def test_trains_even_out_within_one_round(stages: int, requests: int) -> None:
    trains = TrainScheduler(max_trains=stages, max_batch=8)
    ids = [f"r{i}" for i in range(requests)]
    for request in ids:
        trains.ready(request)
    for _ in range(stages + 1):  # every train passes the tail, in ring order
        for train_id, members in list(trains.trains.items()):
            trains.passed(train_id, list(members))
    sizes = sorted(len(m) for m in trains.trains.values())
    carried = min(requests, stages * 8)
    assert sum(sizes) == carried and len(trains.waiting) == requests - carried
    assert len(sizes) <= stages and sizes[-1] - sizes[0] <= 1 and sizes[-1] <= 8


def test_every_request_is_in_one_train_or_waiting_whatever_happens() -> None:
    # Random arrivals, steps and departures against the invariants.
    import random

    for seed in range(200):
        rng = random.Random(seed)
        trains = TrainScheduler(max_trains=rng.randint(1, 4), max_batch=rng.randint(1, 5))
        live: set[str] = set()
        for step in range(60):
            event = rng.random()
            if event < 0.3:
                request = f"r{seed}-{step}"
                live.add(request)
                trains.ready(request)
            elif event < 0.85 and trains.trains:
                train_id = rng.choice(sorted(trains.trains))
                members = list(trains.trains[train_id])
                finished = {m for m in members if rng.random() < 0.2}
                live -= finished
                decoding = len(trains.waiting) + sum(len(m) for m in trains.trains.values())
                fair = -(-decoding // trains.max_trains)
                for dispatch in trains.passed(train_id,
                                              [m for m in members if m not in finished]):
                    assert len(dispatch.members) <= max(fair, len(members))
            elif live:
                request = rng.choice(sorted(live))
                live.discard(request)
                trains.forget(request)
                trains.drain_waiting()
            placed = [m for members in trains.trains.values() for m in members]
            assert sorted(placed + trains.waiting) == sorted(live)
            assert len(placed) == len(set(placed))
            assert len(trains.trains) <= trains.max_trains
            assert all(len(m) <= trains.max_batch for m in trains.trains.values())
            # Nobody waits while a train is missing.
            assert not trains.waiting or len(trains.trains) == trains.max_trains


def test_a_lone_request_keeps_running_alone() -> None:
    trains = TrainScheduler(max_trains=1)
    trains.ready("a")
    for _ in range(3):
        [dispatch] = trains.passed("a", ["a"])
        assert dispatch == dispatch.__class__("a", ("a",), batched=False)


def test_forgotten_requests_leave_trains_and_queues() -> None:
    trains = TrainScheduler(max_trains=1, max_batch=2)
    trains.ready("a")
    trains.ready("b")
    trains.ready("c")
    [dispatch] = trains.passed("a", ["a"])
    assert dispatch.members == ("a", "b")  # the batch is full: c keeps waiting
    trains.forget("c")
    trains.forget("a")
    assert trains.trains[dispatch.train_id] == ("b",)
    trains.forget("b")
    assert trains.trains == {} and trains.waiting == []


# ----- the maths: a batched step is bit for bit the single steps ---------------------------

BATCH_SPECS = {**{f"{arch}-{spec.dtype}": spec for arch, spec in FLOAT_SPECS.items()},
               "qwen3-q4": QWEN3_Q4, "qwen3_5_moe-q4": QUANT_SPECS["qwen3_5_moe"]}


def batched_and_single_logits(stage: Stage, steps: int = 3):
    """Four requests of different lengths (some past the sliding window), decoded together
    from merged caches and alone from their own; yields both logits per step."""
    prompts = [[(7 * i + j) % 300 + 3 for j in range(length)] for i, length in
               enumerate([5, 17, 9, 30])]
    caches = []
    for prompt in prompts:
        own = stage.new_caches()
        h, _ = stage.forward(stage.embed(mx.array([prompt])), 0, own)
        mx.eval(h)
        caches.append(own)
    batch = {layer: type(caches[0][layer]).merge([c[layer] for c in caches])
             for layer in caches[0]}
    tokens = [11, 22, 33, 44]
    for _ in range(steps):
        singles = []
        for own, token in zip(caches, tokens, strict=True):
            h, _ = stage.forward(stage.embed(mx.array([[token]])), 0, own)
            singles.append(stage.logits(h))
        h, _ = stage.forward(stage.embed(mx.array([[t] for t in tokens])), 0, batch)
        yield mx.concatenate(singles), stage.logits(h)
        tokens = [t + 1 for t in tokens]


@pytest.mark.parametrize("name", list(BATCH_SPECS))
def test_batched_decode_step_equals_single_steps(name: str, make_model) -> None:
    stage = Stage(make_model(BATCH_SPECS[name]), list(range(8)))
    if not batchable(stage.cache_templates):
        # Sliding windows: the tail sends one request per frame instead (next test).
        assert any(isinstance(c, RotatingKVCache) for c in stage.cache_templates)
        return
    for single, batched in batched_and_single_logits(stage):
        assert mx.array_equal(single, batched).item()


def test_sliding_window_models_decode_one_request_per_frame(make_model) -> None:
    for arch in ("gemma3_text", "gpt_oss"):
        stage = Stage(make_model(FLOAT_SPECS[arch]), list(range(8)))
        tail = Tail(stage, RequestTable())
        assert tail.scheduler.max_batch == 1, arch
        if arch == "gpt_oss":  # what batching would risk: keys reordered past the window
            assert any(not mx.array_equal(single, batched).item()
                       for single, batched in batched_and_single_logits(stage))
    stage = Stage(make_model(FLOAT_SPECS["qwen3_next"]), list(range(8)))
    tail = Tail(stage, RequestTable())
    assert tail.scheduler.max_batch > 1  # linear-attention state batches exactly


# ----- through the ring ---------------------------------------------------------------------


@pytest.mark.slow  # starts real processes
def test_many_concurrent_requests_keep_their_tokens(make_model, start_ring) -> None:
    model = make_model(QWEN3_BF16)
    ring = start_ring(model, [[0, 1, 2, 3], [4, 5, 6, 7]])
    prompts = [[(13 * i + j) % 400 + 3 for j in range(4 + 5 * i)] for i in range(8)]
    lengths = [24 + 4 * i for i in range(8)]  # members leave their trains at different steps
    got: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        response = httpx.post(f"{ring.url}/v1/completions", timeout=120, json={
            "prompt": prompts[i], "max_tokens": lengths[i], "ignore_eos": True,
            "return_token_ids": True})
        got[i] = response.json()["choices"][0]["token_ids"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for i in range(8):
        assert got.get(i) == reference_tokens(model, prompts[i], lengths[i], ignore_eos=True), i
