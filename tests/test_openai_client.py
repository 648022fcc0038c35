"""The official OpenAI Python client works against a node, without warnings."""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from dnet.local_ring import LocalRing
from tests.conftest import chat_prompt_ids, reference_tokens

pytestmark = pytest.mark.slow  # starts real processes


@pytest.fixture(scope="module")
def ring(qwen3_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRing]:
    ring = LocalRing(str(qwen3_model), [[0, 1, 2, 3], [4, 5, 6, 7]],
                     log_dir=tmp_path_factory.mktemp("openai"))
    ring.start(timeout_s=90)
    try:
        yield ring
    finally:
        ring.stop()


@pytest.fixture
def client(ring: LocalRing) -> OpenAI:
    return OpenAI(base_url=f"{ring.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(autouse=True)
def no_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the client must parse our answers without a warning
        yield


def test_models_list(client: OpenAI, qwen3_model: Path) -> None:
    assert [m.id for m in client.models.list()] == [str(qwen3_model)]


def test_chat_completion(client: OpenAI, qwen3_model: Path) -> None:
    answer = client.chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": "What is 2+2?"}],
        max_tokens=12, extra_body={"return_token_ids": True})
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    reference = reference_tokens(qwen3_model, chat_prompt_ids(qwen3_model, "What is 2+2?"), 12)
    assert choice.model_extra["token_ids"] == reference
    assert answer.usage.completion_tokens == len(reference)


def test_chat_completion_streaming(client: OpenAI) -> None:
    streamed = client.chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": "What is 2+2?"}],
        max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": "What is 2+2?"}],
        max_tokens=12)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_text_completion_with_logprobs(client: OpenAI) -> None:
    answer = client.completions.create(model="default_model", prompt="The quick brown fox",
                                       max_tokens=6, logprobs=2)
    choice = answer.choices[0]
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs)


def test_errors_are_openai_errors(client: OpenAI) -> None:
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model",
                                       messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default_model", messages=[])


def test_dnet_chat_streams_in_the_terminal(ring: LocalRing) -> None:
    result = subprocess.run([sys.executable, "-m", "dnet.cli", "chat", "--api", ring.url,
                             "--max-tokens", "8", "--temperature", "0"],
                            input="hello there\n/quit\n", capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "model>" in result.stdout
    answer = result.stdout.split("model>", 1)[1].strip()
    assert answer, result.stdout
