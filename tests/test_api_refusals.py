"""Parameters the APIs know but do not support get a 400 naming them (never a 200 that ignores
them); prompts are rendered off the event loop; the client commands send the API key.

In-process: a FakeBackend on a generated tokenizer, no sockets."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi.testclient import TestClient

from dnet.api.app import HttpOptions, create_app
from dnet.modelgen import ModelSpec
from tests.api_support import FakeBackend

USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def toy_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from dnet.modelgen import cached_model
    from dnet.tokenizer import load_chat_tokenizer

    model = cached_model(ModelSpec(num_layers=1, hidden_size=64, intermediate_size=128,
                                   num_heads=2, num_kv_heads=1),
                         cache_dir=tmp_path_factory.mktemp("review-models"))
    return load_chat_tokenizer(model)


@pytest.fixture
def client(toy_tokenizer) -> TestClient:
    backend = FakeBackend(toy_tokenizer, vocab_size=512)
    backend.script = [[5, 6, 7]]
    return TestClient(create_app(backend, options=HttpOptions()))


# ----- parameters accepted but ignored ------------------------------------------------------

def test_chat_top_logprobs_without_logprobs_is_rejected(client: TestClient) -> None:
    """`top_logprobs: 5` without `logprobs: true` answers 200 with `logprobs: null`: the
    parameter is silently ignored (OpenAI answers 400: logprobs must be true)."""
    r = client.post("/v1/chat/completions",
                    json={"messages": USER, "max_tokens": 2, "top_logprobs": 5})
    assert r.status_code == 400, r.text


@pytest.mark.parametrize("field", [{"suffix": "xyz"}, {"best_of": 3}])
def test_completions_suffix_and_best_of_are_not_silently_ignored(client: TestClient,
                                                                  field: dict) -> None:
    """/v1/completions accepts `suffix` (insertion) and `best_of` and ignores both."""
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **field})
    assert r.status_code == 400, r.text


@pytest.mark.parametrize("field", [{"modalities": ["audio"]},
                                   {"audio": {"voice": "alloy", "format": "mp3"}},
                                   {"functions": [{"name": "f", "parameters": {}}]},
                                   {"prediction": {"type": "content", "content": "x"}},
                                   {"web_search_options": {"search_context_size": "low"}}])
def test_chat_audio_output_is_rejected(client: TestClient, field: dict) -> None:
    """README: audio is not supported, 'a 400 that says so'; asking for audio output gets a
    200 with text only."""
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, **field})
    assert r.status_code == 400, r.text


def test_responses_conversation_is_rejected_like_previous_response_id(
        client: TestClient) -> None:
    """`previous_response_id` gets a 400 (nothing is stored), but `conversation` (the same
    server-side state by another name) is silently dropped."""
    r = client.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2,
                                           "conversation": "conv_123"})
    assert r.status_code == 400, r.text


def test_responses_logprobs_are_returned_or_refused(client: TestClient) -> None:
    """`top_logprobs` + `include: ["message.output_text.logprobs"]` answer 200 with
    `logprobs: []`: accepted, ignored."""
    r = client.post("/v1/responses", json={
        "input": "hi", "max_output_tokens": 2, "top_logprobs": 2,
        "include": ["message.output_text.logprobs"]})
    if r.status_code == 200:
        part = r.json()["output"][0]["content"][0]
        assert part["logprobs"], r.text
    else:
        assert r.status_code == 400


# ----- the event loop -----------------------------------------------------------------------

def test_chat_prompt_is_rendered_off_the_event_loop(client: TestClient,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Templating + tokenizing runs on the event loop: one ~8 MB prompt (under the 16 MiB
    limit, rejected as too long only after tokenizing it) froze every other client's stream on
    the same API for ~5.7 s (measured on `dnet api`, 2-core machine)."""
    import dnet.api.openai_chat as openai_chat

    real = openai_chat.chat_jobs
    on_loop: list[bool] = []

    def spy(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real(*args, **kwargs)

    monkeypatch.setattr(openai_chat, "chat_jobs", spy)
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert on_loop == [False], "the prompt was rendered and tokenized on the event loop"


# ----- the CLI against a node with --api-key ------------------------------------------------

def test_dnet_status_sends_the_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dnet status --api HOST` against a node started with --api-key: 401, even with
    DNET_API_KEY set (`dnet chat` sends it; status and load have no way to)."""
    import dnet.status as status

    seen: dict = {}

    def fake_get(url, **kwargs):
        seen.update(kwargs)
        return httpx.Response(200, json={}, request=httpx.Request("GET", url))

    monkeypatch.setenv("DNET_API_KEY", "sekrit")
    monkeypatch.setattr(status.httpx, "get", fake_get)
    status.fetch_topology("http://127.0.0.1:1")
    headers = {k.lower(): v for k, v in (seen.get("headers") or {}).items()}
    assert headers.get("authorization") == "Bearer sekrit"


def test_dnet_load_sends_the_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    import dnet.status as status

    seen: dict = {}

    def fake_post(url, **kwargs):
        seen.update(kwargs)
        return httpx.Response(200, json={"epoch": 1}, request=httpx.Request("POST", url))

    monkeypatch.setenv("DNET_API_KEY", "sekrit")
    monkeypatch.setattr(status.httpx, "post", fake_post)
    assert status.run_load("m", api="127.0.0.1:1", host=None) == 0
    headers = {k.lower(): v for k, v in (seen.get("headers") or {}).items()}
    assert headers.get("authorization") == "Bearer sekrit"


def test_text_modality_and_best_of_equal_to_n_are_fine(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2,
                                                  "modalities": ["text"]})
    assert r.status_code == 200, r.text
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "best_of": 1})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field", [{"prompt": {"id": "pmpt_1"}}, {"background": True}])
def test_responses_stored_prompts_and_background_runs_are_refused(client: TestClient,
                                                                   field: dict) -> None:
    r = client.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2, **field})
    assert r.status_code == 400, r.text
    assert next(iter(field)) in r.json()["error"]["message"]


def test_anthropic_mcp_servers_are_refused(client: TestClient) -> None:
    r = client.post("/v1/messages", json={
        "max_tokens": 2, "messages": USER,
        "mcp_servers": [{"type": "url", "url": "https://example.invalid", "name": "x"}]})
    assert r.status_code == 400, r.text
    assert "mcp_servers" in r.json()["error"]["message"]
