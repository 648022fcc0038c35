"""Limits answer clearly (429, 503, 401, 413) instead of crashing or running out of memory.

Each ring runs in this process (`inprocess_ring` in conftest.py), behind a real HTTP server.
"""

from __future__ import annotations

import json
import threading

import httpx

from dnet.local_ring import shard_health


def post(url: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120, **kwargs)


def test_concurrent_requests_past_the_cap_get_429(inprocess_ring) -> None:
    ring = inprocess_ring([list(range(8))], http=True, max_requests=2)
    statuses: list[int] = []
    opened = threading.Barrier(3, timeout=60)

    def long_stream() -> None:
        body = {"prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{ring.url}/v1/completions", json=body,
                          timeout=120) as response:
            statuses.append(response.status_code)
            opened.wait()
            for _ in response.iter_lines():
                pass

    streams = [threading.Thread(target=long_stream) for _ in range(2)]
    for thread in streams:
        thread.start()
    opened.wait()  # both are generating now
    third = post(ring.url, {"prompt": [5, 6, 7], "max_tokens": 4})
    assert third.status_code == 429, third.text
    assert third.json()["error"]["type"] == "rate_limit_error"
    for thread in streams:
        thread.join(timeout=120)
    assert statuses == [200, 200]
    assert post(ring.url, {"prompt": [5, 6, 7], "max_tokens": 4}).status_code == 200


def test_a_full_kv_cache_refuses_new_requests_with_503(inprocess_ring) -> None:
    # The generated model keeps 2 KiB of KV cache per token over its 8 layers: a 100 kB cap
    # admits about 50 tokens of prompt plus answer.
    ring = inprocess_ring([[0, 1, 2, 3], [4, 5, 6, 7]], http=True, grpc=True,
                          kv_cap_bytes=100_000)  # --max-kv-bytes 100kB
    small = post(ring.url, {"prompt": list(range(5, 25)), "max_tokens": 20})
    assert small.status_code == 200, small.text
    big = post(ring.url, {"prompt": list(range(5, 25)), "max_tokens": 200})
    assert big.status_code == 503
    assert "KV cache full" in big.json()["error"]["message"]
    for address in ring.shard_addresses:  # nothing was left reserved
        health = shard_health(address)
        assert health is not None and health.active_requests == 0
    assert post(ring.url, {"prompt": list(range(5, 25)), "max_tokens": 20}).status_code == 200


def test_api_key_guards_the_api(inprocess_ring) -> None:
    ring = inprocess_ring([list(range(8))], http=True, api_key="s3cret")
    assert httpx.get(f"{ring.url}/v1/models", timeout=10).status_code == 401
    wrong = httpx.get(f"{ring.url}/v1/models", timeout=10,
                      headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    right = httpx.get(f"{ring.url}/v1/models", timeout=10,
                      headers={"Authorization": "Bearer s3cret"})
    assert right.status_code == 200
    assert httpx.get(f"{ring.url}/health", timeout=10).status_code == 200


def test_huge_max_tokens_stops_at_the_context_and_huge_bodies_are_413(
        inprocess_ring) -> None:
    ring = inprocess_ring([list(range(8))], http=True, max_context=48)
    answer = post(ring.url, {"prompt": list(range(5, 25)), "max_tokens": 10**9,
                             "ignore_eos": True})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["finish_reason"] == "length"
    assert answer.json()["usage"]["completion_tokens"] == 48 - 20
    body = json.dumps({"prompt": "x" * (50 * 1024 * 1024)}).encode()
    too_big = httpx.post(f"{ring.url}/v1/completions", content=body, timeout=60,
                         headers={"content-type": "application/json"})
    assert too_big.status_code == 413
    assert httpx.get(f"{ring.url}/health", timeout=10).status_code == 200
