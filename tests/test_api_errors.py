"""Bad requests and broken rings get OpenAI-shaped errors, never a hang, and the API lives on.

The shared ring's API runs with `--max-context 64`, so a modest prompt is already too long.
It runs in this process (`tests/inprocess.py`) behind a real HTTP server on loopback; the
tests that need the API as its own process are marked slow.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dnet.local_ring import LocalRing, api_healthy, shard_health
from tests.conftest import wait_until
from tests.inprocess import InProcessRing

MAX_CONTEXT = 64
CLIENT_TIMEOUT = httpx.Timeout(20.0)  # a hang fails the test instead of the suite
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def ring(qwen3_model: Path) -> Iterator[InProcessRing]:
    with InProcessRing(qwen3_model, [list(range(8))]) as ring:
        ring.serve_http(max_context=MAX_CONTEXT)
        yield ring


def post(url: str, path: str, body: object = None, *, content: bytes | None = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    if content is not None:
        return httpx.post(url + path, content=content, timeout=CLIENT_TIMEOUT,
                          headers={"content-type": "application/json", **(headers or {})})
    return httpx.post(url + path, json=body, timeout=CLIENT_TIMEOUT)


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict:
    """The body is exactly OpenAI's {"error": {message, type, param, code}}; returns it."""
    if status is None:
        assert 400 <= response.status_code < 500, (response.status_code, response.text)
    else:
        assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


def assert_still_serving(url: str) -> None:
    response = post(url, CHAT, {"messages": USER, "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


# (path, JSON body or raw bytes, the param the error should name or None for "any")
BAD_REQUESTS: dict[str, tuple[str, object, str | None]] = {
    "malformed-json": (CHAT, b'{"messages": [{"role": "user", "content": "Hi"}', None),
    "not-utf8": (CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe\xfa"}]}', None),
    "empty-body": (CHAT, b"", None),
    "json-array": (CHAT, b"[1, 2, 3]", None),
    "json-string": (CHAT, b'"hello"', None),
    "missing-messages": (CHAT, {"max_tokens": 5}, "messages"),
    "empty-messages": (CHAT, {"messages": []}, "messages"),
    "messages-string": (CHAT, {"messages": "Hi"}, "messages"),
    "message-string": (CHAT, {"messages": ["Hi"]}, "messages"),
    "message-no-role": (CHAT, {"messages": [{"content": "Hi"}]}, "messages"),
    "unknown-role": (CHAT, {"messages": [{"role": "wizard", "content": "Hi"}]}, "messages"),
    "content-number": (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages"),
    "max-tokens-string": (CHAT, {"messages": USER, "max_tokens": "ten"}, "max_tokens"),
    "max-tokens-zero": (CHAT, {"messages": USER, "max_tokens": 0}, "max_tokens"),
    "max-tokens-negative": (CHAT, {"messages": USER, "max_tokens": -3}, "max_tokens"),
    "max-tokens-fraction": (CHAT, {"messages": USER, "max_tokens": 2.5}, "max_tokens"),
    "max-completion-tokens-zero": (CHAT, {"messages": USER, "max_completion_tokens": 0},
                                   "max_completion_tokens"),
    "temperature-list": (CHAT, {"messages": USER, "temperature": [0.5]}, "temperature"),
    "temperature-negative": (CHAT, {"messages": USER, "temperature": -0.5}, "temperature"),
    "temperature-nan": (CHAT, b'{"messages": [{"role": "user", "content": "Hi"}], '
                              b'"temperature": NaN}', "temperature"),
    "temperature-infinity": (CHAT, b'{"messages": [{"role": "user", "content": "Hi"}], '
                                   b'"temperature": Infinity}', "temperature"),
    "temperature-too-high": (CHAT, {"messages": USER, "temperature": 2.5}, "temperature"),
    "top-p-zero": (CHAT, {"messages": USER, "top_p": 0}, "top_p"),
    "top-k-huge": (CHAT, {"messages": USER, "top_k": 10**10}, "top_k"),
    "repetition-context-size-huge": (CHAT, {"messages": USER,
                                            "repetition_context_size": 10**10},
                                     "repetition_context_size"),
    "n-too-many": (CHAT, {"messages": USER, "n": 17}, "n"),
    "user-without-content": (CHAT, {"messages": [{"role": "user"}]}, "messages[0].content"),
    "image-part": (CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
        "messages[0].content[0]"),
    "tools-without-a-tool-format": (CHAT, {"messages": USER, "tools": [{"type": "function",
                                    "function": {"name": "f"}}]}, "tools"),
    "stop-empty": (CHAT, {"messages": USER, "stop": ""}, "stop"),
    "stop-too-many": (CHAT, {"messages": USER, "stop": [f"s{i}" for i in range(40)]}, "stop"),
    "top-logprobs-too-many": (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 50},
                              "top_logprobs"),
    "logit-bias-not-a-token": (CHAT, {"messages": USER, "logit_bias": {"abc": 1}},
                               "logit_bias"),
    "logit-bias-out-of-range": (CHAT, {"messages": USER, "logit_bias": {"10000000": 1}},
                                "logit_bias"),
    "stream-options-string": (CHAT, {"messages": USER, "stream": True,
                                     "stream_options": "usage"}, "stream_options"),
    "completion-missing-prompt": (COMPLETIONS, {"max_tokens": 5}, "prompt"),
    "completion-empty-prompt": (COMPLETIONS, {"prompt": ""}, "prompt"),
    "completion-empty-token-list": (COMPLETIONS, {"prompt": []}, "prompt"),
    "completion-token-too-big": (COMPLETIONS, {"prompt": [1, 2, 10_000_000]}, "prompt"),
    "completion-token-vocab-size": (COMPLETIONS, {"prompt": [1, 2, 512]}, "prompt"),
    "completion-token-negative": (COMPLETIONS, {"prompt": [1, -1]}, "prompt"),
    "completion-two-prompts": (COMPLETIONS, {"prompt": ["a", "b"]}, "prompt"),
    "completion-n-too-many": (COMPLETIONS, {"prompt": "Hi", "n": 17}, "n"),
    "completion-max-tokens-zero": (COMPLETIONS, {"prompt": "Hi", "max_tokens": 0},
                                   "max_tokens"),
    "completion-logprobs-too-many": (COMPLETIONS, {"prompt": "Hi", "logprobs": 50},
                                     "logprobs"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_an_openai_error_and_the_server_keeps_answering(
        ring: InProcessRing, case: str) -> None:
    path, body, param = BAD_REQUESTS[case]
    if isinstance(body, bytes):
        response = post(ring.url, path, content=body)
    else:
        response = post(ring.url, path, body)
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error", error
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error
    assert_still_serving(ring.url)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_unknown_model_is_404_model_not_found(ring: InProcessRing, path: str) -> None:
    body = {"model": "gpt-17-ultra", "max_tokens": 2,
            **({"messages": USER} if path == CHAT else {"prompt": "Hi"})}
    error = assert_openai_error(post(ring.url, path, body), 404)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "gpt-17-ultra" in error["message"]
    assert_still_serving(ring.url)


def test_streaming_request_with_an_error_is_a_plain_json_error(ring: InProcessRing) -> None:
    response = post(ring.url, CHAT, {"messages": USER, "stream": True, "max_tokens": 0})
    assert_openai_error(response, 400)
    response = post(ring.url, CHAT, {"model": "nope", "messages": USER, "stream": True})
    assert_openai_error(response, 404)
    assert_still_serving(ring.url)


def test_chat_prompt_longer_than_the_context_is_rejected(ring: InProcessRing) -> None:
    long = "The quick brown fox jumps over the lazy dog. " * 20
    for stream in (False, True):
        response = post(ring.url, CHAT, {"messages": [{"role": "user", "content": long}],
                                         "max_tokens": 5, "stream": stream})
        error = assert_openai_error(response, 400)
        assert error["code"] == "context_length_exceeded", error
    assert_still_serving(ring.url)


def test_token_prompt_longer_than_the_context_is_rejected(ring: InProcessRing) -> None:
    for length in (MAX_CONTEXT, MAX_CONTEXT + 1, 1000):
        response = post(ring.url, COMPLETIONS, {"prompt": [5] * length, "max_tokens": 1})
        error = assert_openai_error(response, 400)
        assert error["code"] == "context_length_exceeded", error
    assert_still_serving(ring.url)


def test_prompt_plus_answer_fits_in_the_context(ring: InProcessRing) -> None:
    prompt = [(7 * i) % 500 + 3 for i in range(MAX_CONTEXT - 4)]
    response = post(ring.url, COMPLETIONS, {"prompt": prompt, "max_tokens": 50,
                                            "ignore_eos": True})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": MAX_CONTEXT - 4, "completion_tokens": 4,
                               "total_tokens": MAX_CONTEXT,
                               "prompt_tokens_details": {"cached_tokens": 0}}


def test_unknown_fields_are_ignored(ring: InProcessRing) -> None:
    body = {"messages": [{"role": "user", "content": "Hi", "shiny_new_field": {"x": 1}}],
            "max_tokens": 3, "user": "someone", "frobnicate": [1, 2, 3], "tools": [],
            "parallel_tool_calls": False, "metadata": {"a": "b"}, "store": False}
    response = post(ring.url, CHAT, body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"
    # A known parameter we cannot honour is refused (test_api_refusals.py); null is no request.
    response = post(ring.url, COMPLETIONS, {"prompt": "Hi", "max_tokens": 3, "suffix": None,
                                            "best_of": 1, "whatever": None})
    assert response.status_code == 200, response.text


def test_content_as_a_list_of_text_parts_is_accepted(ring: InProcessRing) -> None:
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                      {"type": "text", "text": " there"}]}],
            "max_tokens": 3}
    response = post(ring.url, CHAT, body)
    assert response.status_code == 200, response.text


def big_body(size: int) -> bytes:
    head = b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "pad": "'
    tail = b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def test_body_over_16_mib_is_413(ring: InProcessRing) -> None:
    response = post(ring.url, CHAT, content=big_body(16 * 1024 * 1024 + 1024))
    assert_openai_error(response, 413)
    assert_still_serving(ring.url)


def test_chunked_body_over_16_mib_is_413(ring: InProcessRing) -> None:
    # No content-length: the limit must hold for the bytes actually sent, too.
    body = big_body(17 * 1024 * 1024)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 1024 * 1024):
            yield body[i:i + 1024 * 1024]

    response = httpx.post(ring.url + CHAT, content=chunks(), timeout=CLIENT_TIMEOUT,
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 413)
    assert_still_serving(ring.url)


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/nothing-here"),
                                              ("GET", CHAT), ("POST", "/v1/models")])
def test_unknown_routes_and_methods_get_an_openai_error(ring: InProcessRing, method: str,
                                                        path: str) -> None:
    response = httpx.request(method, ring.url + path, timeout=CLIENT_TIMEOUT)
    assert_openai_error(response)


# ----- rings that cannot serve ---------------------------------------------------------------


def assert_unavailable(response: httpx.Response) -> None:
    assert 500 <= response.status_code < 600, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body


@pytest.mark.slow
def test_api_whose_first_shard_is_unreachable_answers_503(qwen3_model: Path,
                                                          tmp_path: Path) -> None:
    # Only the API runs; nothing listens on the first shard's port.
    ring = LocalRing(str(qwen3_model), [list(range(8))])
    log = open(tmp_path / "api.log", "wb")  # noqa: SIM115 - closed in finally
    try:
        ring.processes.append(subprocess.Popen(ring.api_command(), stdout=log,
                                               stderr=subprocess.STDOUT))
        ring.names.append("api")
        wait_until(lambda: api_healthy(ring.url), 60, "the API answers /health")
        for stream in (False, True, False):
            response = post(ring.url, CHAT, {"messages": USER, "max_tokens": 5,
                                             "stream": stream})
            assert response.status_code == 503, response.text
            assert_unavailable(response)
        response = post(ring.url, COMPLETIONS, {"prompt": [1, 2, 3], "max_tokens": 5})
        assert response.status_code == 503, response.text
        assert ring.processes[0].poll() is None, "the API process died"
        assert api_healthy(ring.url)
    finally:
        ring.stop()
        log.close()


@pytest.mark.slow
def test_ring_with_a_killed_shard_answers_5xx_and_the_api_survives(qwen3_model: Path,
                                                                   start_ring) -> None:
    ring = start_ring(qwen3_model, [[0, 1, 2, 3], [4, 5, 6, 7]])
    api = ring.processes[-1]
    head = ring.shard_addresses[0]
    assert_still_serving(ring.url)  # the links round the ring are open now

    ring.processes[1].kill()
    ring.processes[1].wait(timeout=10)
    for stream in (False, True, False):
        response = post(ring.url, CHAT, {"messages": USER, "max_tokens": 20, "stream": stream})
        assert_unavailable(response)
    assert api.poll() is None, "the API process died"
    assert api_healthy(ring.url)
    # The surviving shard does not keep the failed requests' KV caches.
    wait_until(lambda: getattr(shard_health(head), "active_requests", -1) == 0, 15,
               "the head shard holds no KV cache")

    # With the head gone too, the API still answers, with an error.
    ring.processes[0].kill()
    ring.processes[0].wait(timeout=10)
    for stream in (False, True):
        response = post(ring.url, CHAT, {"messages": USER, "max_tokens": 20, "stream": stream})
        assert_unavailable(response)
    assert api.poll() is None, "the API process died"
    assert api_healthy(ring.url)


def test_health_and_models_still_answer_after_all_that(ring: InProcessRing) -> None:
    health = httpx.get(ring.url + "/health", timeout=CLIENT_TIMEOUT)
    assert health.status_code == 200 and health.json()["role"] == "api"
    models = httpx.get(ring.url + "/v1/models", timeout=CLIENT_TIMEOUT)
    assert models.status_code == 200
    assert [m["id"] for m in models.json()["data"]] == [ring.model]
    json.dumps(models.json())  # plain JSON
