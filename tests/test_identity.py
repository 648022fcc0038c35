"""The ring's tokens are exactly single-process mlx-lm's, over real processes and HTTP."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from dnet.modelgen import ModelSpec
from tests.conftest import (
    DEEPSEEK_F32,
    LLAMA_F16,
    QWEN2_Q8,
    QWEN3_BF16,
    QWEN3_Q4,
    chat_prompt_ids,
    reference_tokens,
)

pytestmark = pytest.mark.slow  # starts real processes

MAX_TOKENS = 24

# (model, layer lists): 1, 2 and 3 shards, contiguous and multi-round (non-contiguous) rings.
RINGS = {
    "qwen3-bf16-1-shard": (QWEN3_BF16, [list(range(8))]),
    "qwen3-bf16-2-shards": (QWEN3_BF16, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    # Three shards, two rounds; the tail (layer 7) is in the middle of the ring order.
    "qwen3-bf16-3-shards-multi-round": (QWEN3_BF16, [[0, 1, 6], [2, 3, 7], [4, 5]]),
    "qwen3-4bit-2-shards": (QWEN3_Q4, [[0, 1, 2], [3, 4, 5, 6, 7]]),
    "deepseek-v2-f32-3-shards": (DEEPSEEK_F32, [[0, 1], [2, 3, 4], [5, 6, 7]]),
    "llama-f16-2-shards-multi-round": (LLAMA_F16, [[0, 1, 4, 5], [2, 3, 6, 7]]),
    "qwen2-8bit-2-shards": (QWEN2_Q8, [[0, 1, 2, 3, 4], [5, 6, 7]]),
}

CHAT_PROMPTS = ["What is 2+2?", "Tell me about the quick brown fox and the lazy dog. " * 4]
# Token-id prompts through /v1/completions: 1 token, a few, a few hundred; and on two rings
# (a 2048-token prefill takes seconds on a CPU) 2048 tokens, and more than one prefill chunk.
PROMPT_LENGTHS = [1, 17, 300]
LONG_PROMPT_LENGTHS = {"qwen3-bf16-2-shards": [2048, 2100],
                       "qwen3-bf16-3-shards-multi-round": [2048]}


def assert_diverse(reference: list[int]) -> None:
    # A broken ring can still "match" a reference that repeats one token.
    assert len(set(reference)) >= max(4, len(reference) // 3), reference


def chat_ids(url: str, content: str, *, stream: bool, **extra) -> list[int]:
    body = {"model": "default_model", "messages": [{"role": "user", "content": content}],
            "max_tokens": MAX_TOKENS, "return_token_ids": True, "stream": stream, **extra}
    if not stream:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["token_ids"]
    ids: list[int] = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    ids.extend(choice["token_ids"])
    return ids


def completion_ids(url: str, prompt: list[int], **extra) -> list[int]:
    body = {"model": "default_model", "prompt": prompt, "max_tokens": MAX_TOKENS,
            "return_token_ids": True, "ignore_eos": True, **extra}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


@pytest.mark.parametrize("ring_name", list(RINGS))
def test_ring_matches_mlx_lm(ring_name: str, make_model, start_ring) -> None:
    spec, layer_lists = RINGS[ring_name]
    model = make_model(spec)
    ring = start_ring(model, layer_lists)

    for i, content in enumerate(CHAT_PROMPTS):
        prompt = chat_prompt_ids(model, content)
        reference = reference_tokens(model, prompt, MAX_TOKENS)
        assert_diverse(reference)
        assert chat_ids(ring.url, content, stream=i % 2 == 0) == reference, content
        assert chat_ids(ring.url, content, stream=i % 2 == 1) == reference, content

    rng = random.Random(ring_name)
    vocab = ModelSpec().vocab_size
    for length in PROMPT_LENGTHS + LONG_PROMPT_LENGTHS.get(ring_name, []):
        prompt = [rng.randrange(3, vocab) for _ in range(length)]
        reference = reference_tokens(model, prompt, MAX_TOKENS, ignore_eos=True)
        assert_diverse(reference)
        assert completion_ids(ring.url, prompt) == reference, f"prompt of {length} tokens"


def test_seeded_sampling_and_penalties_match_mlx_lm(qwen3_model, start_ring) -> None:
    ring = start_ring(qwen3_model, [[0, 1, 2], [3, 4, 5, 6, 7]])
    prompt = chat_prompt_ids(qwen3_model, "Sample something, please.")

    reference = reference_tokens(qwen3_model, prompt, MAX_TOKENS, temperature=0.9, seed=1234,
                                 top_p=0.95, top_k=50, min_p=0.02)
    assert_diverse(reference)
    got = chat_ids(ring.url, "Sample something, please.", stream=False, temperature=0.9,
                   seed=1234, top_p=0.95, top_k=50, min_p=0.02)
    assert got == reference
    # A different seed samples differently: the seed really reaches the sampler.
    other = chat_ids(ring.url, "Sample something, please.", stream=False, temperature=0.9,
                     seed=4321, top_p=0.95, top_k=50, min_p=0.02)
    assert other != reference

    penalised = reference_tokens(qwen3_model, prompt, MAX_TOKENS, repetition_penalty=1.5)
    assert penalised != reference_tokens(qwen3_model, prompt, MAX_TOKENS)
    assert chat_ids(ring.url, "Sample something, please.", stream=True,
                    repetition_penalty=1.5) == penalised
