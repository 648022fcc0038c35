"""Mixture-of-experts, hybrid-attention and sliding-window models on rings of real processes.

A representative subset of tests/test_arch_matrix.py over gRPC and HTTP: a MoE model (routed
plus a dense first layer) and a hybrid model (linear-attention ArraysCache state) with weights
streamed through a window on a multi-round ring, and a sliding-window model (rotating caches,
decoded one request per frame); chat streaming and not, greedy and seeded, a prompt longer
than every window, and 4 concurrent requests whose tokens each equal their own request's.
"""

from __future__ import annotations

import random
import threading

import httpx
import pytest

from dnet.local_ring import shard_health
from dnet.modelgen import SLIDING_WINDOW
from tests.conftest import FLOAT_SPECS, chat_prompt_ids, reference_tokens, wait_until
from tests.test_identity import assert_diverse, chat_ids, completion_ids

pytestmark = pytest.mark.slow

MAX_TOKENS = 20

# (spec, layer lists, windows): None keeps every layer resident.
RINGS = {
    "qwen3_moe-multi-round-streamed": (FLOAT_SPECS["qwen3_moe"],
                                       [[0, 1, 4, 5], [2, 3, 6, 7]], [2, None]),
    "qwen3_5-hybrid-3-shards-streamed": (FLOAT_SPECS["qwen3_5"],
                                         [[0, 1, 2], [3, 4, 5], [6, 7]], [None, 2, None]),
    "gemma3_text-sliding-window-2-shards": (FLOAT_SPECS["gemma3_text"],
                                            [[0, 1, 2, 3], [4, 5, 6, 7]], [None, None]),
}


def concurrent_completions(url: str, prompts: list[list[int]], lengths: list[int]) -> dict:
    got: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        response = httpx.post(f"{url}/v1/completions", timeout=180, json={
            "prompt": prompts[i], "max_tokens": lengths[i], "ignore_eos": True,
            "return_token_ids": True})
        got[i] = response.json()["choices"][0]["token_ids"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    return got


@pytest.mark.parametrize("name", list(RINGS))
def test_real_ring_matches_mlx_lm(name: str, make_model, start_ring) -> None:
    spec, layer_lists, windows = RINGS[name]
    model = make_model(spec)
    ring = start_ring(model, layer_lists, per_shard_args=[
        ["--prefetch-window", str(w)] if w else [] for w in windows])
    for address, window, layers in zip(ring.shard_addresses, windows, layer_lists, strict=True):
        health = shard_health(address)
        assert health is not None and health.window == (window or len(layers))

    content = "Tell me about the quick brown fox."
    reference = reference_tokens(model, chat_prompt_ids(model, content), MAX_TOKENS)
    assert_diverse(reference)
    assert chat_ids(ring.url, content, stream=True, max_tokens=MAX_TOKENS) == reference
    assert chat_ids(ring.url, content, stream=False, max_tokens=MAX_TOKENS) == reference

    seeded = {"temperature": 0.9, "top_p": 0.95, "seed": 7}
    reference = reference_tokens(model, chat_prompt_ids(model, content), MAX_TOKENS,
                                 temperature=0.9, top_p=0.95, seed=7)
    assert_diverse(reference)
    assert chat_ids(ring.url, content, stream=True, max_tokens=MAX_TOKENS, **seeded) == reference

    rng = random.Random(name)
    prompts = [[rng.randrange(3, 500) for _ in range(length)]
               for length in (3 * SLIDING_WINDOW, 5, 2 * SLIDING_WINDOW + 3, 11)]
    lengths = [MAX_TOKENS + 4 * i for i in range(4)]  # they leave their trains at different steps
    references = [reference_tokens(model, p, n, ignore_eos=True)
                  for p, n in zip(prompts, lengths, strict=True)]
    for reference in references:
        assert_diverse(reference)
    assert completion_ids(ring.url, prompts[0], max_tokens=lengths[0]) == references[0]
    got = concurrent_completions(ring.url, prompts, lengths)
    for i, reference in enumerate(references):
        assert got.get(i) == reference, i
    assert_released_everywhere(ring)

    # A client that goes away mid-answer: its caches (KV, window or state) leave every shard.
    body = {"prompt": prompts[0], "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{ring.url}/v1/completions", json=body, timeout=60) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i > 4:
                break
    assert_released_everywhere(ring)


def assert_released_everywhere(ring) -> None:
    for address in ring.shard_addresses:
        wait_until(lambda a=address: getattr(shard_health(a), "active_requests", -1) == 0,
                   30, f"{address} holds no request")
