"""What a client sees of the prefix cache through the HTTP API: the cached prompt tokens in
each surface's usage (OpenAI chat and text completions, Responses, Anthropic Messages), and
n choices that prefill their prompt once."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.prefix.test_ring_prefix import BLOCK, TWO

SYSTEM = ("You are a careful assistant who answers in full sentences and never forgets what "
          "was said before in this conversation, however long it grows. ") * 2


def post(ring, path: str, body: dict) -> dict:
    response = httpx.post(f"{ring.url}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def stream_usage(ring, body: dict) -> dict:
    with httpx.stream("POST", f"{ring.url}/v1/chat/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True}},
            timeout=60) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: {")]
    return events[-1]["usage"]


@pytest.fixture
def ring(inprocess_ring):
    return inprocess_ring(TWO, http=True, prefill_chunk=BLOCK)


def test_chat_usage_reports_the_prompt_tokens_the_cache_supplied(ring) -> None:
    body = {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": "What did I say first?"}],
            "max_tokens": 4}
    first = post(ring, "/v1/chat/completions", body)["usage"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    prompt = first["prompt_tokens"]
    assert prompt > 3 * BLOCK
    blocks = (prompt - 1) // BLOCK
    again = post(ring, "/v1/chat/completions", body)["usage"]
    assert again["prompt_tokens"] == prompt
    assert again["prompt_tokens_details"] == {"cached_tokens": blocks * BLOCK}
    assert stream_usage(ring, body)["prompt_tokens_details"] == {
        "cached_tokens": blocks * BLOCK}
    text = post(ring, "/v1/completions", {"prompt": SYSTEM, "max_tokens": 3})["usage"]
    text = post(ring, "/v1/completions", {"prompt": SYSTEM, "max_tokens": 3})["usage"]
    assert text["prompt_tokens_details"]["cached_tokens"] == (
        (text["prompt_tokens"] - 1) // BLOCK * BLOCK) > 0


def test_responses_and_messages_report_cache_reads_their_way(ring) -> None:
    responses = {"input": SYSTEM + " Summarise.", "max_output_tokens": 4}
    post(ring, "/v1/responses", responses)
    usage = post(ring, "/v1/responses", responses)["usage"]
    cached = (usage["input_tokens"] - 1) // BLOCK * BLOCK
    assert usage["input_tokens_details"]["cached_tokens"] == cached > 0
    messages = {"model": "default_model", "max_tokens": 4, "system": SYSTEM,
                "messages": [{"role": "user", "content": "Summarise."}]}
    first = post(ring, "/v1/messages", messages)["usage"]
    assert first["cache_read_input_tokens"] == 0
    prompt = first["input_tokens"]
    usage = post(ring, "/v1/messages", messages)["usage"]
    # Anthropic counts input after the cache read: the prompt is the two together.
    assert usage["cache_read_input_tokens"] == (prompt - 1) // BLOCK * BLOCK > 0
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == prompt
    assert usage["cache_creation_input_tokens"] == 0


def test_n_choices_prefill_their_prompt_once(ring) -> None:
    body = {"messages": [{"role": "user", "content": SYSTEM}], "max_tokens": 6, "n": 3,
            "temperature": 0.9, "seed": 11}
    answer = post(ring, "/v1/chat/completions", body)
    assert len(answer["choices"]) == 3
    blocks = (answer["usage"]["prompt_tokens"] - 1) // BLOCK
    assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # choice 0's
    # Choices 1 and 2 started from choice 0's blocks on every shard.
    assert [r.prefix_stats.restored_blocks for r in ring.runtimes()] == [2 * blocks] * 2
    # The same seeds give the same choices, cache or not.
    again = post(ring, "/v1/chat/completions", body)
    assert [c["message"] for c in again["choices"]] == [c["message"] for c in answer["choices"]]
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": blocks * BLOCK}
