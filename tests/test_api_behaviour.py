"""What an OpenAI client sees from a working ring: answers, streams, stops, log-probabilities,
and KV caches that are freed however a request ends.

The ring runs in this process (`tests/inprocess.py`): two shards and the entry on loopback
gRPC, the HTTP API on a loopback port.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dnet.local_ring import shard_health
from tests.conftest import chat_prompt_ids, reference_tokenizer, wait_until
from tests.inprocess import InProcessRing

LAYERS = [[0, 1, 2, 3], [4, 5, 6, 7]]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
TIMEOUT = httpx.Timeout(60.0)
STORY = "Tell me a long story about the quick brown fox."
LONG_GENERATION = 4000  # tokens: far longer than any wait below


@pytest.fixture(scope="module")
def ring(qwen3_model: Path) -> Iterator[InProcessRing]:
    with InProcessRing(qwen3_model, LAYERS, grpc=True) as ring:
        ring.serve_http()
        yield ring


def chat_body(content: str = STORY, **extra: Any) -> dict[str, Any]:
    return {"model": "default_model", "messages": [{"role": "user", "content": content}],
            "temperature": 0, **extra}


def post(ring: InProcessRing, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(ring.url + path, json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def stream(ring: InProcessRing, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks of an SSE answer; checks the framing and the final `data: [DONE]`."""
    with httpx.stream("POST", ring.url + path, json={**body, "stream": True},
                      timeout=TIMEOUT) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines, "empty stream"
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    assert lines.count("data: [DONE]") == 1
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all("error" not in chunk for chunk in chunks), chunks
    return chunks


def streamed_text(chunks: list[dict[str, Any]], kind: str = "chat") -> str:
    if kind == "chat":
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                       if c["choices"])
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def finish_reasons(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["choices"][0]["finish_reason"] for c in chunks
            if c["choices"] and c["choices"][0]["finish_reason"] is not None]



def active(address: str) -> int:
    reply = shard_health(address)
    return -1 if reply is None else reply.active_requests


def entry_address(ring: InProcessRing) -> str:
    return httpx.get(ring.url + "/health", timeout=TIMEOUT).json()["token_sink"]


def nodes(ring: InProcessRing) -> list[str]:
    """Every shard, and the API's token sink (its gRPC side)."""
    return [*ring.shard_addresses, entry_address(ring)]


def wait_all_caches_freed(ring: InProcessRing, timeout_s: float = 15.0) -> None:
    for address in nodes(ring):
        wait_until(lambda a=address: active(a) == 0, timeout_s,
                   f"{address} holds no request")


# ----- basics ------------------------------------------------------------------------------


def test_health_answers_with_role_api(ring: InProcessRing) -> None:
    response = httpx.get(ring.url + "/health", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.json()["role"] == "api"


def test_models_lists_the_model(ring: InProcessRing) -> None:
    response = httpx.get(ring.url + "/v1/models", timeout=TIMEOUT)
    assert response.status_code == 200
    listing = response.json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == [ring.model]
    assert listing["data"][0]["object"] == "model"


@pytest.mark.parametrize("model", ["default_model", None, "the-path", "the-listed-id"])
def test_model_names_that_are_accepted(ring: InProcessRing, model: str | None) -> None:
    body = chat_body(max_tokens=3)
    if model is None:
        del body["model"]
    elif model == "the-path":
        body["model"] = ring.model
    elif model == "the-listed-id":
        body["model"] = httpx.get(ring.url + "/v1/models", timeout=TIMEOUT).json()["data"][0]["id"]
    answer = post(ring, CHAT, body)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["role"] == "assistant"


def test_non_streaming_chat_usage_matches_the_tokens(ring: InProcessRing,
                                                     qwen3_model: Path) -> None:
    answer = post(ring, CHAT, chat_body(max_tokens=12, ignore_eos=True, return_token_ids=True))
    choice = answer["choices"][0]
    assert answer["id"].startswith("chatcmpl-")
    assert answer["model"] == ring.model
    assert choice["finish_reason"] == "length"
    assert len(choice["token_ids"]) == 12
    assert answer["usage"] == {"prompt_tokens": len(chat_prompt_ids(qwen3_model, STORY)),
                               "completion_tokens": 12,
                               "total_tokens": len(chat_prompt_ids(qwen3_model, STORY)) + 12,
                               "prompt_tokens_details": {"cached_tokens": 0}}
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]


def test_non_streaming_completion_usage_matches_the_tokens(ring: InProcessRing) -> None:
    prompt = [5, 17, 99, 200, 31, 8, 77]
    answer = post(ring, COMPLETIONS, {"prompt": prompt, "max_tokens": 9, "ignore_eos": True,
                                      "return_token_ids": True, "temperature": 0})
    choice = answer["choices"][0]
    assert answer["object"] == "text_completion"
    assert choice["finish_reason"] == "length"
    assert len(choice["token_ids"]) == 9
    assert answer["usage"] == {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16,
                               "prompt_tokens_details": {"cached_tokens": 0}}


def test_without_ignore_eos_the_answer_ends_at_eos_or_max_tokens(ring: InProcessRing,
                                                                 qwen3_model: Path) -> None:
    eos = set(reference_tokenizer(qwen3_model).eos_token_ids)
    for content in ("Hi", STORY, "What is two plus two?"):
        answer = post(ring, CHAT, chat_body(content, max_tokens=40, return_token_ids=True))
        choice, usage = answer["choices"][0], answer["usage"]
        assert len(choice["token_ids"]) == usage["completion_tokens"]
        assert not eos & set(choice["token_ids"]), "the end-of-sequence token was returned"
        if choice["finish_reason"] == "length":
            assert usage["completion_tokens"] == 40
        else:
            assert choice["finish_reason"] == "stop"
            assert usage["completion_tokens"] < 40


# ----- streaming ---------------------------------------------------------------------------


def test_streamed_chat_equals_the_non_streamed_answer(ring: InProcessRing) -> None:
    body = chat_body(max_tokens=30, ignore_eos=True, return_token_ids=True)
    full = post(ring, CHAT, body)["choices"][0]
    chunks = stream(ring, CHAT, body)

    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert streamed_text(chunks) == full["message"]["content"]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == full["token_ids"]
    assert finish_reasons(chunks) == ["length"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c or c["usage"] is None for c in chunks)


def test_streamed_completion_equals_the_non_streamed_answer(ring: InProcessRing) -> None:
    body = {"prompt": "The quick brown fox", "max_tokens": 25, "ignore_eos": True,
            "temperature": 0}
    full = post(ring, COMPLETIONS, body)["choices"][0]
    chunks = stream(ring, COMPLETIONS, body)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert streamed_text(chunks, "text") == full["text"]
    assert finish_reasons(chunks) == ["length"]


def test_stream_options_include_usage_adds_a_final_usage_chunk(ring: InProcessRing) -> None:
    body = chat_body(max_tokens=10, ignore_eos=True)
    usage = post(ring, CHAT, body)["usage"]
    chunks = stream(ring, CHAT, {**body, "stream_options": {"include_usage": True}})
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"] == usage == {"prompt_tokens": usage["prompt_tokens"],
                                      "completion_tokens": 10,
                                      "total_tokens": usage["prompt_tokens"] + 10,
                                      "prompt_tokens_details": {"cached_tokens": 0}}
    assert all(c["usage"] is None for c in chunks[:-1])


# ----- stop strings ------------------------------------------------------------------------


def full_story(ring: InProcessRing) -> str:
    text = post(ring, CHAT, chat_body(max_tokens=30, ignore_eos=True))["choices"][0]["message"][
        "content"]
    assert len(text) >= 20, text
    return text


def pick_stop(text: str, start: int, end: int) -> str:
    """A printable 3-character piece of text[start:end] that first occurs after the start."""
    for size in (3, 2):
        for i in range(start, max(start, end - size)):
            piece = text[i:i + size]
            if (len(piece) == size and piece.isprintable() and "\ufffd" not in piece
                    and piece.strip() == piece and text.index(piece) > 0):
                return piece
    pytest.fail(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("streamed", [False, True])
def test_stop_string_ends_the_answer_before_it(ring: InProcessRing, streamed: bool) -> None:
    full = full_story(ring)
    stop = pick_stop(full, len(full) // 3, 2 * len(full) // 3)
    expected = full[:full.index(stop)]
    body = chat_body(max_tokens=30, ignore_eos=True, stop=stop)
    if streamed:
        chunks = stream(ring, CHAT, body)
        text, reasons = streamed_text(chunks), finish_reasons(chunks)
    else:
        choice = post(ring, CHAT, body)["choices"][0]
        text, reasons = choice["message"]["content"], [choice["finish_reason"]]
    assert text == expected, (stop, full)
    assert stop not in text
    assert reasons == ["stop"]
    wait_all_caches_freed(ring)


def test_earliest_of_two_stop_strings_wins(ring: InProcessRing) -> None:
    full = full_story(ring)
    early = pick_stop(full, len(full) // 4, len(full) // 2)
    late = pick_stop(full, 2 * len(full) // 3, len(full))
    if full.index(late) <= full.index(early):
        late, early = early, late
    answer = post(ring, CHAT, chat_body(max_tokens=30, ignore_eos=True, stop=[late, early]))
    choice = answer["choices"][0]
    assert choice["message"]["content"] == full[:full.index(early)], (early, late, full)
    assert choice["finish_reason"] == "stop"


def test_stop_string_on_text_completions(ring: InProcessRing) -> None:
    body = {"prompt": [10, 20, 30, 40], "max_tokens": 30, "ignore_eos": True, "temperature": 0}
    full = post(ring, COMPLETIONS, body)["choices"][0]["text"]
    stop = pick_stop(full, len(full) // 3, 2 * len(full) // 3)
    choice = post(ring, COMPLETIONS, {**body, "stop": [stop]})["choices"][0]
    assert choice["text"] == full[:full.index(stop)]
    assert choice["finish_reason"] == "stop"
    chunks = stream(ring, COMPLETIONS, {**body, "stop": stop})
    assert streamed_text(chunks, "text") == full[:full.index(stop)]
    assert finish_reasons(chunks) == ["stop"]


# ----- log-probabilities -------------------------------------------------------------------


def test_chat_logprobs_with_top_logprobs(ring: InProcessRing) -> None:
    answer = post(ring, CHAT, chat_body(max_tokens=8, ignore_eos=True, logprobs=True,
                                        top_logprobs=3))
    content = answer["choices"][0]["logprobs"]["content"]
    assert len(content) == answer["usage"]["completion_tokens"] == 8
    for entry in content:
        assert isinstance(entry["token"], str)
        assert isinstance(entry["logprob"], float) and entry["logprob"] <= 0
        assert all(isinstance(b, int) and 0 <= b < 256 for b in entry["bytes"])
        top = entry["top_logprobs"]
        assert len(top) == 3
        for alternative in top:
            assert set(alternative) >= {"token", "logprob", "bytes"}
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True)
        # Greedy decoding picks the most likely token.
        assert entry["logprob"] == pytest.approx(values[0], abs=1e-6)


def test_chat_without_logprobs_has_none(ring: InProcessRing) -> None:
    answer = post(ring, CHAT, chat_body(max_tokens=3))
    assert answer["choices"][0]["logprobs"] is None


def test_completion_logprobs_use_the_legacy_shape(ring: InProcessRing) -> None:
    answer = post(ring, COMPLETIONS, {"prompt": "Hello there", "max_tokens": 6,
                                      "ignore_eos": True, "logprobs": 2, "temperature": 0})
    logprobs = answer["choices"][0]["logprobs"]
    assert set(logprobs) >= {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    n = answer["usage"]["completion_tokens"]
    assert n == 6
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == n
    assert len(logprobs["top_logprobs"]) == len(logprobs["text_offset"]) == n
    assert all(isinstance(t, str) for t in logprobs["tokens"])
    assert all(v <= 0 for v in logprobs["token_logprobs"])
    for chosen, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert isinstance(top, dict) and 1 <= len(top) <= 2
        assert chosen == pytest.approx(max(top.values()), abs=1e-6)
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)


# ----- lifecycle: KV caches are freed however a request ends -------------------------------


def test_caches_are_freed_after_normal_completion(ring: InProcessRing) -> None:
    post(ring, CHAT, chat_body(max_tokens=20, ignore_eos=True))
    stream(ring, CHAT, chat_body(max_tokens=20, ignore_eos=True))
    post(ring, COMPLETIONS, {"prompt": [1, 2, 3], "max_tokens": 5})
    wait_all_caches_freed(ring)


def test_client_closing_a_stream_frees_the_caches(ring: InProcessRing) -> None:
    wait_all_caches_freed(ring)  # nothing else runs on the ring
    body = chat_body(max_tokens=LONG_GENERATION, ignore_eos=True, stream=True)
    with httpx.Client(timeout=TIMEOUT) as client, client.stream(
            "POST", ring.url + CHAT, json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # held: dropping it would close the connection
        chunks = [line for line in itertools.islice(lines, 10) if line.startswith("data: ")]
        assert len(chunks) == 5 and "[DONE]" not in chunks[-1]
        # Mid-generation every node holds the request.
        assert [active(a) for a in nodes(ring)] == [1, 1, 1]
        # Leaving the block closes the connection long before the answer is complete.
    wait_all_caches_freed(ring)
    stream(ring, CHAT, chat_body(max_tokens=5))  # and the ring serves on


def test_concurrent_requests_get_the_same_answers_as_alone(ring: InProcessRing) -> None:
    contents = ["Hi", STORY, "What is two plus two?", "Count to ten."]
    alone = [post(ring, CHAT, chat_body(c, max_tokens=20, ignore_eos=True, return_token_ids=True))
             ["choices"][0]["token_ids"] for c in contents]
    together: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        together[i] = post(ring, CHAT, chat_body(contents[i], max_tokens=20, ignore_eos=True,
                                                 return_token_ids=True))["choices"][0][
            "token_ids"]

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(len(contents))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [together.get(i) for i in range(len(contents))] == alone
    wait_all_caches_freed(ring)


# Last in the file: if caches leak here, the runaway generation cannot disturb other tests.
def test_client_giving_up_on_a_non_streaming_request_frees_the_caches(ring: InProcessRing) -> None:
    wait_all_caches_freed(ring)  # nothing else runs on the ring
    body = chat_body(max_tokens=LONG_GENERATION, ignore_eos=True)
    outcome: list[BaseException | httpx.Response] = []

    def impatient_client() -> None:
        try:
            outcome.append(httpx.post(ring.url + CHAT, json=body,
                                      timeout=httpx.Timeout(10.0, read=3.0)))
        except httpx.HTTPError as exc:
            outcome.append(exc)

    client = threading.Thread(target=impatient_client, daemon=True)
    client.start()
    wait_until(lambda: all(active(a) == 1 for a in ring.shard_addresses), 10,
               "the request runs on every shard")
    client.join(timeout=30)
    assert not client.is_alive()
    assert isinstance(outcome[0], httpx.ReadTimeout), outcome
    wait_all_caches_freed(ring)
    post(ring, CHAT, chat_body(max_tokens=3))
