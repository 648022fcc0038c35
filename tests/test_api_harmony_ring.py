"""gpt-oss's harmony format end to end: a random-weight gpt-oss with gpt-oss's real vocabulary
and a template of its template's structure (tests/harmony_support.py) on two shards, through
the official openai client (Anthropic's API has no logit bias to steer this model with; its
mapping is tested in-process, tests/test_api_harmony.py).

A random model does not speak harmony by itself, so the grammar at the tail makes it: a forced
tool call is written `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>` +
arguments, a JSON answer `<|channel|>final<|message|>` + JSON, and the API must parse what the
ring streams back into tool calls and content. A model may reason first (an analysis message);
this one would babble there until its token budget ran out, so a logit bias against the tokens
that begin "analysis" makes it answer at once. `<|return|>` and `<|call|>` must end an answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
from tokenizers import Tokenizer

from dnet.local_ring import LocalRing
from tests.harmony_support import CALL, RETURN

pytestmark = pytest.mark.slow

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 16},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "JST"]}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                            "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time.",
                                            "parameters": TIME}}]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def ring(gptoss_vocab_model: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[LocalRing]:
    ring = LocalRing(str(gptoss_vocab_model), [[0, 1], [2, 3]],
                     log_dir=tmp_path_factory.mktemp("harmony-ring"))
    ring.start(timeout_s=120)
    try:
        yield ring
    finally:
        ring.stop()


@pytest.fixture(scope="module")
def no_analysis(gptoss_vocab_model: Path) -> dict[str, int]:
    """A logit bias against every token that begins the channel name "analysis"."""
    vocab = Tokenizer.from_file(str(gptoss_vocab_model / "tokenizer.json")).get_vocab()
    return {str(i): -100 for piece, i in vocab.items() if piece and
            "analysis".startswith(piece)}


@pytest.fixture
def client(ring: LocalRing) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{ring.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def test_a_forced_call_streams_as_a_tool_call_and_ends_the_answer(
        client: openai.OpenAI, no_analysis: dict[str, int]) -> None:
    chunks = list(client.chat.completions.create(
        model="default_model", messages=USER, tools=TOOLS, max_tokens=120, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        logit_bias=no_analysis, stream_options={"include_usage": True}))
    calls = [c for chunk in chunks if chunk.choices
             for c in chunk.choices[0].delta.tool_calls or []]
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] == "tool_calls" and not any(finishes[:-1])
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert "<|" not in text and chunks[-1].usage.completion_tokens < 120


def test_a_json_schema_answer_is_the_final_channel(client: openai.OpenAI,
                                                   no_analysis: dict[str, int]) -> None:
    answer = client.chat.completions.create(
        model="default_model", messages=USER, max_tokens=120, logit_bias=no_analysis,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}})
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), WEATHER)


@pytest.mark.parametrize("end", [RETURN, CALL])
def test_return_and_call_end_the_answer(client: openai.OpenAI, end: int) -> None:
    answer = client.chat.completions.create(
        model="default_model", messages=USER, max_tokens=20, logit_bias={str(end): 100})
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == 0  # the end token itself is not output
