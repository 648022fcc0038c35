"""The prefix cache's flags, end to end in real processes: `--prefill-chunk` and
`--prefix-cache-bytes` on `dnet join`, `dnet shard` and `dnet api`; cached tokens in usage,
the cache's bytes and hit rate in `/v1/topology`, and the same tokens as mlx-lm."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import chat_prompt_ids, reference_tokens
from tests.mesh import LocalMesh, ring_covers, wait_for

pytestmark = pytest.mark.slow  # starts real processes

BLOCK = 16
QUESTION = ("Tell me, once more and in as many words as it takes, what the weather was like "
            "on the day we first met by the river")
MAX_TOKENS = 8


def chat(url: str) -> dict:
    response = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": QUESTION}], "max_tokens": MAX_TOKENS,
        "return_token_ids": True})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def reference(qwen3_model: Path) -> tuple[list[int], int]:
    prompt = chat_prompt_ids(qwen3_model, QUESTION)
    assert len(prompt) > 2 * BLOCK
    tokens = reference_tokens(qwen3_model, prompt, MAX_TOKENS, prefill_step_size=BLOCK)
    assert len(set(tokens)) >= MAX_TOKENS // 3
    return tokens, (len(prompt) - 1) // BLOCK * BLOCK


def test_manual_mode_flags(start_ring, qwen3_model: Path, reference) -> None:
    tokens, cacheable = reference
    on = start_ring(qwen3_model, [[0, 1, 2, 3], [4, 5, 6, 7]],
                    shard_args=["--prefix-cache-bytes", "1MB"],
                    api_args=["--prefill-chunk", str(BLOCK)])
    off = start_ring(qwen3_model, [[0, 1, 2, 3], [4, 5, 6, 7]],
                     per_shard_args=[[], ["--prefix-cache-bytes", "0"]],
                     api_args=["--prefill-chunk", str(BLOCK)])
    for ring, reused in ((on, cacheable), (off, 0)):
        first, second = chat(ring.url), chat(ring.url)
        assert first["choices"][0]["token_ids"] == second["choices"][0]["token_ids"] == tokens
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        # One shard without a cache is enough to reuse nothing: every shard must agree.
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == reused


def test_mesh_flags_and_topology(mesh: LocalMesh, reference) -> None:
    tokens, cacheable = reference
    # 6 MB budgets make a ring of two (tests/test_mesh.py); one node sets 1 MB aside for its
    # cache, which the planner leaves free; the other sizes its cache from the plan.
    nodes = [mesh.add("node0", budget="6MB", extra=["--prefill-chunk", str(BLOCK),
                                                    "--prefix-cache-bytes", "1MB"]),
             mesh.add("node1", budget="6MB", propose=False,
                      extra=["--prefill-chunk", str(BLOCK)])]
    view = wait_for(mesh, ring_covers(8, size=2), 120, "a ring of two nodes")
    by_name = {n["name"]: n for n in view["nodes"]}
    assert by_name["node0"]["prefix_cache_capacity_bytes"] == 1_000_000
    assert 0 < by_name["node1"]["prefix_cache_capacity_bytes"] <= 6_000_000 // 8
    for node in nodes:
        first, second = chat(node.url), chat(node.url)
        assert first["choices"][0]["token_ids"] == second["choices"][0]["token_ids"] == tokens
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == cacheable
    view = httpx.get(f"{nodes[1].url}/v1/topology", timeout=10).json()
    for node in view["nodes"]:
        assert node["prefix_cache_bytes"] > 0 and 0 < node["prefix_cache_hit_rate"] < 1
