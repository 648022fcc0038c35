"""The agent-facing API against a real ring, through the official openai and anthropic clients.

A random-weight Qwen3 with the real Qwen3 vocabulary and chat template runs on two shards.
A random model would rather babble than call a tool, so these tests ask for guaranteed calls
(`tool_choice` required / named, Anthropic's `any`) and JSON output: the grammar at the tail
must make even this model produce schema-valid calls and JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from dnet.local_ring import LocalRing
from dnet.modelgen import cached_model
from tests.api_support import END_THINK, ENDOFTEXT, qwen3_vocab_spec, thinking_variant
from tests.conftest import reference_tokenizer

pytestmark = pytest.mark.slow

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 16},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "JST"]},
                                         "hours": {"type": "integer", "minimum": 0,
                                                   "maximum": 23}},
        "required": ["zone", "hours"], "additionalProperties": False}
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time.",
                                      "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def start(model: Path, layers: list[list[int]], log_dir: Path) -> LocalRing:
    ring = LocalRing(str(model), layers, log_dir=log_dir)
    ring.start(timeout_s=120)
    return ring


@pytest.fixture(scope="module")
def ring(qwen3_vocab_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRing]:
    ring = start(qwen3_vocab_model, [[0, 1], [2, 3]], tmp_path_factory.mktemp("api-ring"))
    try:
        yield ring
    finally:
        ring.stop()


@pytest.fixture
def client(ring: LocalRing) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{ring.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture
def claude(ring: LocalRing) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=ring.url, api_key="unused", max_retries=0, timeout=120)


def check_call(name: str, arguments: str | dict) -> None:
    value = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(value, SCHEMAS[name])


# ----- OpenAI chat completions --------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_openai_forced_tool_call_round_trip(client: openai.OpenAI, stream: bool) -> None:
    kwargs = {"model": "default_model", "tools": OPENAI_TOOLS, "max_tokens": 80,
              "extra_body": NO_THINKING}
    if stream:
        chunks = list(client.chat.completions.create(messages=USER, tool_choice="required",
                                                     stream=True, **kwargs))
        calls = [c for chunk in chunks if chunk.choices
                 for c in chunk.choices[0].delta.tool_calls or []]
        finish = chunks[-1].choices[0].finish_reason
        call_id, name, arguments = calls[0].id, calls[0].function.name, calls[0].function.arguments
    else:
        answer = client.chat.completions.create(messages=USER, tool_choice="required", **kwargs)
        finish = answer.choices[0].finish_reason
        call = answer.choices[0].message.tool_calls[0]
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
    assert finish == "tool_calls"
    check_call(name, arguments)
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 24 C"}]
    final = client.chat.completions.create(messages=history, tool_choice="none", **{
        **kwargs, "max_tokens": 6})
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.tool_calls is None


def test_a_named_tool_choice_calls_that_tool(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="default_model", messages=USER, tools=OPENAI_TOOLS, max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        extra_body=NO_THINKING)
    call = answer.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time"
    check_call("get_time", call.function.arguments)


def test_json_schema_response_format_gives_schema_valid_json(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="default_model", messages=USER, max_tokens=80, extra_body=NO_THINKING,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}})
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), WEATHER)


# ----- Anthropic Messages and OpenAI Responses ----------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_tool_round_trip(claude: anthropic.Anthropic, stream: bool) -> None:
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in OPENAI_TOOLS]
    # The newest SDK no longer sends `temperature` (Anthropic's default is 1.0): extra_body
    # does, for a reproducible test.
    kwargs = {"model": "default_model", "max_tokens": 120, "tools": tools,
              "thinking": {"type": "disabled"}, "extra_body": {"temperature": 0.0}}
    if stream:
        with claude.messages.stream(messages=USER, tool_choice={"type": "any"},
                                    **kwargs) as events:
            message = events.get_final_message()
    else:
        message = claude.messages.create(messages=USER, tool_choice={"type": "any"}, **kwargs)
    assert message.stop_reason == "tool_use"
    use = message.content[-1]
    check_call(use.name, use.input)
    final = claude.messages.create(messages=[
        *USER, {"role": "assistant", "content": message.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": "sunny"}]}],
        **{**kwargs, "max_tokens": 6})
    assert final.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert final.usage.input_tokens > message.usage.input_tokens


def test_anthropic_structured_output_gives_schema_valid_json(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="default_model", max_tokens=120, messages=USER, thinking={"type": "disabled"},
        extra_body={"temperature": 0.0},
        output_config={"format": {"type": "json_schema", "schema": WEATHER}})
    assert message.stop_reason == "end_turn"
    jsonschema.validate(json.loads(message.content[0].text), WEATHER)


@pytest.mark.parametrize("stream", [False, True])
def test_responses_tool_round_trip(client: openai.OpenAI, stream: bool) -> None:
    tools = [{"type": "function", "name": t["function"]["name"],
              "parameters": t["function"]["parameters"]} for t in OPENAI_TOOLS]
    kwargs = {"model": "default_model", "tools": tools, "max_output_tokens": 80,
              "reasoning": {"effort": "none"}, "temperature": 0.0}
    if stream:
        with client.responses.stream(input="Weather in Paris?", tool_choice="required",
                                     **kwargs) as events:
            response = events.get_final_response()
    else:
        response = client.responses.create(input="Weather in Paris?", tool_choice="required",
                                           **kwargs)
    call = [item for item in response.output if item.type == "function_call"][0]
    check_call(call.name, call.arguments)
    final = client.responses.create(input=[
        {"role": "user", "content": "Weather in Paris?"},
        *[item.model_dump(exclude_none=True) for item in response.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        **{**kwargs, "max_output_tokens": 6})
    assert final.status in ("completed", "incomplete")
    assert final.usage.input_tokens > response.usage.input_tokens


# ----- OpenAI details ----------------------------------------------------------------------

def test_echo_scores_the_prompt_as_mlx_lm_does(ring: LocalRing, qwen3_vocab_model: Path) -> None:
    import mlx.core as mx

    from tests.conftest import _loaded

    prompt = "The quick brown fox jumps over the lazy dog"
    answer = httpx.post(f"{ring.url}/v1/completions", timeout=120, json={
        "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0}).json()
    choice = answer["choices"][0]
    assert choice["text"] == prompt and answer["usage"]["completion_tokens"] == 0
    model, tokenizer = _loaded(str(qwen3_vocab_model))
    ids = tokenizer.encode(prompt)
    logits = model(mx.array(ids)[None])[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    expected = [logprobs[k, ids[k + 1]].item() for k in range(len(ids) - 1)]
    scores = choice["logprobs"]["token_logprobs"]
    assert scores[0] is None and len(scores) == len(ids)
    assert scores[1:] == pytest.approx(expected, abs=0.1)  # bf16 model, chunked at the tail


def test_n_choices_are_seeded_like_single_requests(client: openai.OpenAI) -> None:
    kwargs = {"model": "default_model", "prompt": "Once upon a time", "max_tokens": 8,
              "temperature": 1.0, "seed": 11, "extra_body": {"ignore_eos": True}}
    two = client.completions.create(n=2, **kwargs)
    again = client.completions.create(n=2, **kwargs)
    one = client.completions.create(n=1, **kwargs)
    texts = [c.text for c in two.choices]
    assert texts == [c.text for c in again.choices]
    assert texts[0] == one.choices[0].text and texts[1] != texts[0]


def test_completions_are_the_exact_continuation_and_every_eos_stops(
        ring: LocalRing, qwen3_vocab_model: Path) -> None:
    hf = AutoTokenizer.from_pretrained(qwen3_vocab_model)
    prompt = "Hello"
    answer = httpx.post(f"{ring.url}/v1/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": 12, "return_token_ids": True}).json()["choices"][0]
    assert prompt + answer["text"] == hf.decode(hf.encode(prompt) + answer["token_ids"])
    # <|endoftext|> (declared in generation_config.json) ends an answer like <|im_end|>.
    ended = httpx.post(f"{ring.url}/v1/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": 12, "logit_bias": {str(ENDOFTEXT): 100}}).json()
    assert ended["choices"][0]["finish_reason"] == "stop"
    assert ended["usage"]["completion_tokens"] == 0


def test_cors_head_and_models_by_id_on_a_real_server(ring: LocalRing,
                                                     qwen3_vocab_model: Path) -> None:
    preflight = httpx.options(f"{ring.url}/v1/chat/completions", timeout=10, headers={
        "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code in (200, 204)
    assert preflight.headers["access-control-allow-origin"] in ("*", "http://localhost:5173")
    head = httpx.head(f"{ring.url}/health", timeout=10)
    assert head.status_code == 200 and head.content == b""
    model = httpx.get(f"{ring.url}/v1/models/{qwen3_vocab_model}", timeout=10)
    assert model.json()["id"] == str(qwen3_vocab_model)
    assert httpx.get(f"{ring.url}/v1/models/gpt-4", timeout=10).status_code == 404


# ----- A thinking model ---------------------------------------------------------------------

def test_a_thinking_models_reasoning_is_split_from_its_answer(
        qwen3_tokenizer_dir: Path, model_cache: Path,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    thinking = thinking_variant(qwen3_tokenizer_dir, model_cache / "qwen3-thinking-tokenizer")
    model = cached_model(qwen3_vocab_spec(thinking), cache_dir=model_cache)
    ring = start(model, [[0, 1, 2, 3]], tmp_path_factory.mktemp("thinking-ring"))
    try:
        client = openai.OpenAI(base_url=f"{ring.url}/v1", api_key="unused", max_retries=0)
        # Random weights rarely close a think block: a bias on </think> makes this one do it.
        kwargs = {"model": "default_model", "messages": [{"role": "user", "content": "2+2?"}],
                  "max_tokens": 16, "logit_bias": {str(END_THINK): 8},
                  "extra_body": {"return_token_ids": True}}
        answer = client.chat.completions.create(**kwargs)
        streamed = list(client.chat.completions.create(stream=True, **kwargs))
    finally:
        ring.stop()
    message = answer.choices[0].message
    ids = answer.choices[0].model_extra["token_ids"]
    cut = ids.index(END_THINK)
    decode = reference_tokenizer(model).decode
    assert message.model_extra["reasoning_content"] == decode(ids[:cut]).lstrip("\n")
    assert message.content == decode(ids[cut + 1:]).lstrip("\n")
    assert message.model_extra["reasoning_content"] and message.content
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    assert "".join(d.content or "" for d in deltas) == message.content
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == \
        message.model_extra["reasoning_content"]
