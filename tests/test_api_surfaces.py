"""The HTTP surfaces in-process, on Qwen3's real tokenizer, behind a backend that answers
scripted tokens: what the official openai and anthropic clients see (tool calls, reasoning,
streams), and the details clients rely on (errors, CORS, HEAD, models/{id}, echo, n)."""

from __future__ import annotations

import json

import pytest

from tests.api_support import (
    ENDOFTEXT,
    FakeBackend,
    anthropic_client,
    http,
    last_prompt,
    openai_client,
)

pytestmark = pytest.mark.usefixtures("no_warnings")

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                            "parameters": WEATHER}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
THOUGHT = "<think>\nThe user wants weather.\n</think>\n\nIt is sunny."
USER = [{"role": "user", "content": "Weather in Paris?"}]




@pytest.fixture
def backend(qwen3_tokenizer) -> FakeBackend:
    return FakeBackend(qwen3_tokenizer)










# ----- OpenAI chat completions --------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_openai_tool_round_trip(backend: FakeBackend, stream: bool) -> None:
    client = openai_client(backend.say(CALL, "It is sunny in Paris."))
    kwargs = {"model": "default_model", "tools": TOOLS, "max_tokens": 60}
    if stream:
        chunks = list(client.chat.completions.create(messages=USER, stream=True, **kwargs))
        calls = [c for chunk in chunks if chunk.choices for c in chunk.choices[0].delta.tool_calls
                 or []]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        call_id, name, arguments = calls[0].id, calls[0].function.name, calls[0].function.arguments
    else:
        answer = client.chat.completions.create(messages=USER, **kwargs)
        assert answer.choices[0].finish_reason == "tool_calls"
        assert answer.choices[0].message.content is None
        call = answer.choices[0].message.tool_calls[0]
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
    assert (name, json.loads(arguments)) == ("get_weather", {"city": "Paris"})
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 24 C"}]
    final = client.chat.completions.create(messages=history, **kwargs)
    assert final.choices[0].message.content == "It is sunny in Paris."
    prompt = last_prompt(backend)
    assert CALL in prompt and "<tool_response>\nsunny, 24 C\n</tool_response>" in prompt


def test_reasoning_is_split_from_the_content(backend: FakeBackend) -> None:
    client = openai_client(backend.say(THOUGHT))
    answer = client.chat.completions.create(model="m", messages=USER, max_tokens=50)
    message = answer.choices[0].message
    assert message.content == "It is sunny."
    assert message.model_extra["reasoning_content"] == "The user wants weather.\n"
    chunks = list(client.chat.completions.create(model="m", messages=USER, max_tokens=50,
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "It is sunny."
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == \
        "The user wants weather.\n"


@pytest.mark.parametrize(("body", "closed"), [
    ({"reasoning_effort": "none"}, True), ({"reasoning_effort": "low"}, False),
    ({"reasoning_effort": "none", "chat_template_kwargs": {"enable_thinking": True}}, False)])
def test_reasoning_effort_none_turns_thinking_off(backend: FakeBackend, body: dict,
                                                  closed: bool) -> None:
    http(backend.say("x")).post("/v1/chat/completions", json={"messages": USER, **body})
    assert last_prompt(backend).endswith("<think>\n\n</think>\n\n") is closed


def test_parallel_tool_calls_false_ends_after_the_first_call(backend: FakeBackend) -> None:
    client = openai_client(backend.say(CALL + "\n" + CALL.replace("Paris", "Rome")))
    both = client.chat.completions.create(model="m", messages=USER, tools=TOOLS, max_tokens=90)
    assert len(both.choices[0].message.tool_calls) == 2
    one = client.chat.completions.create(model="m", messages=USER, tools=TOOLS, max_tokens=90,
                                         parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1
    assert one.choices[0].finish_reason == "tool_calls"


def test_a_malformed_tool_call_comes_back_as_text(backend: FakeBackend) -> None:
    broken = "<tool_call>\n{not json}\n</tool_call>"
    client = openai_client(backend.say(broken))
    answer = client.chat.completions.create(model="m", messages=USER, tools=TOOLS, max_tokens=40)
    assert answer.choices[0].message.content == broken
    assert answer.choices[0].finish_reason == "stop"


def test_forced_and_structured_outputs_send_a_grammar_to_the_tail(backend: FakeBackend) -> None:
    client = http(backend.say('{"city": "Paris"}'))
    for extra in ({"tools": TOOLS, "tool_choice": "required"},
                  {"tools": TOOLS, "tool_choice": {"type": "function",
                                                   "function": {"name": "get_weather"}}},
                  {"response_format": {"type": "json_object"}},
                  {"response_format": {"type": "json_schema",
                                       "json_schema": {"name": "w", "schema": WEATHER}}}):
        answer = client.post("/v1/chat/completions", json={"messages": USER, **extra})
        assert answer.status_code == 200, answer.text
        assert "%json" in backend.calls[-1][1].grammar
    client.post("/v1/chat/completions", json={"messages": USER, "tools": TOOLS})
    assert backend.calls[-1][1].grammar == ""  # auto: the model decides, nothing forced


@pytest.mark.parametrize(("extra", "param", "says"), [
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "not among the tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "dependentRequired": {"a": ["b"]}}}}},
     "response_format.json_schema.schema", "dependentRequired"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "ignore_eos"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "required"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,AAAA"}}]}]}, "messages[0].content[0]", "images are not"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "required"),
    ({"n": 17}, "n", "16"),
])
def test_requests_that_cannot_be_served_get_a_400_naming_the_field(
        backend: FakeBackend, extra: dict, param: str, says: str) -> None:
    answer = http(backend.say("x")).post("/v1/chat/completions",
                                         json={"messages": USER, **extra})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_tools_for_a_model_without_a_tool_format_get_a_400(qwen3_model) -> None:
    from dnet.tokenizer import load_chat_tokenizer

    backend = FakeBackend(load_chat_tokenizer(qwen3_model), vocab_size=512).say("x")
    answer = http(backend).post("/v1/chat/completions", json={"messages": USER, "tools": TOOLS})
    assert answer.status_code == 400
    assert "no tool-calling format" in answer.json()["error"]["message"]


def test_malformed_json_gets_a_message_about_the_json(backend: FakeBackend) -> None:
    answer = http(backend).post("/v1/chat/completions", content=b'{"messages": [}',
                                headers={"content-type": "application/json"})
    error = answer.json()["error"]
    assert answer.status_code == 400 and "not valid JSON" in error["message"]
    assert error["param"] is None


def test_chat_logprob_tokens_concatenate_to_the_content(backend: FakeBackend) -> None:
    text = "Zürich 𝄞 𓀀 天气"
    client = openai_client(backend.say(text))
    answer = client.chat.completions.create(model="m", messages=USER, max_tokens=40,
                                            logprobs=True, top_logprobs=2)
    entries = answer.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == answer.choices[0].message.content == text
    assert b"".join(bytes(e.bytes) for e in entries) == text.encode()


def test_n_choices_sample_with_distinct_deterministic_seeds(backend: FakeBackend) -> None:
    client = openai_client(backend.say("a", "b"))
    answer = client.chat.completions.create(model="m", messages=USER, n=2, seed=5,
                                            temperature=0.8, max_tokens=5)
    assert [c.index for c in answer.choices] == [0, 1]
    seeds = [call[1].seed for call in backend.calls]
    assert seeds[0] == 5 and seeds[1] != 5
    client.chat.completions.create(model="m", messages=USER, n=2, seed=5, temperature=0.8,
                                   max_tokens=5)
    assert [call[1].seed for call in backend.calls[2:]] == seeds
    assert answer.usage.prompt_tokens == len(backend.calls[0][0])


# ----- OpenAI text completions --------------------------------------------------------------

def test_completion_text_is_the_exact_continuation(backend: FakeBackend) -> None:
    backend.script = [backend.tokenizer.encode(" world, again") + [ENDOFTEXT]]
    answer = http(backend).post("/v1/completions", json={"prompt": "Hello", "max_tokens": 9})
    assert answer.json()["choices"][0]["text"] == " world, again"  # the space is kept
    assert answer.json()["choices"][0]["finish_reason"] == "stop"  # <|endoftext|> ends it too


def test_echo_with_logprobs_scores_the_prompt(backend: FakeBackend) -> None:
    from dnet.proto import dnet_ring_pb2 as pb

    prompt = "The cat sat"
    ids = backend.tokenizer.encode(prompt)
    backend.prompt_scores = [pb.PromptLogprob(token=t, logprob=-1.0 - k, top_ids=[t, 1],
                                              top_logprobs=[-1.0 - k, -5.0])
                             for k, t in enumerate(ids[1:])]
    backend.say(" on")
    answer = http(backend).post("/v1/completions", json={
        "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0}).json()
    choice = answer["choices"][0]
    assert choice["text"] == prompt and answer["usage"]["completion_tokens"] == 0
    logprobs = choice["logprobs"]
    assert logprobs["token_logprobs"] == [None, *[-1.0 - k for k in range(len(ids) - 1)]]
    assert logprobs["top_logprobs"][0] is None
    assert "".join(logprobs["tokens"]) == prompt
    assert [prompt[o:] for o in logprobs["text_offset"]][0] == prompt
    assert backend.calls[-1][1].prompt_logprobs


def test_echo_without_anything_to_generate_needs_no_ring(backend: FakeBackend) -> None:
    answer = http(backend).post("/v1/completions", json={"prompt": "Hi", "echo": True,
                                                         "max_tokens": 0})
    assert answer.json()["choices"][0]["text"] == "Hi" and not backend.calls


def test_legacy_logprobs_name_byte_fragments_and_index_the_text(backend: FakeBackend) -> None:
    text = "a 𝄞 𓀀 ꙮ"  # rare characters: Qwen3 spells them in byte fragments
    backend.say(text)
    answer = http(backend).post("/v1/completions", json={
        "prompt": "x", "max_tokens": 20, "logprobs": 2}).json()["choices"][0]
    logprobs = answer["logprobs"]
    assert answer["text"] == text
    assert any(t.startswith("bytes:\\x") for t in logprobs["tokens"])
    for offset, token in zip(logprobs["text_offset"], logprobs["tokens"], strict=True):
        if not token.startswith("bytes:"):
            assert text[offset:].startswith(token)
    for chosen, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert chosen in top.values()


# ----- Anthropic Messages -------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_tool_round_trip(backend: FakeBackend, stream: bool) -> None:
    client = anthropic_client(backend.say(CALL, "Sunny."))
    tools = [{"name": "get_weather", "description": "Weather.", "input_schema": WEATHER}]
    kwargs = {"model": "default_model", "max_tokens": 60, "tools": tools,
              "system": "Be brief."}
    if stream:
        with client.messages.stream(messages=USER, **kwargs) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(messages=USER, **kwargs)
    assert message.stop_reason == "tool_use"
    use = message.content[-1]
    assert (use.type, use.name, use.input) == ("tool_use", "get_weather", {"city": "Paris"})
    final = client.messages.create(messages=[
        *USER, {"role": "assistant", "content": message.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": "sunny"}]}], **kwargs)
    assert final.content[0].text == "Sunny." and final.stop_reason == "end_turn"
    prompt = last_prompt(backend)
    assert "<tool_response>\nsunny\n</tool_response>" in prompt and "Be brief." in prompt


def test_anthropic_stream_events_come_in_anthropics_order(backend: FakeBackend) -> None:
    backend.say(THOUGHT)
    with http(backend).stream("POST", "/v1/messages", json={
            "model": "m", "max_tokens": 50, "messages": USER, "stream": True}) as answer:
        kinds = [line.split(": ", 1)[1] for line in answer.iter_lines()
                 if line.startswith("event: ")]
    assert kinds[:2] == ["message_start", "ping"]
    assert kinds[-2:] == ["message_delta", "message_stop"]
    blocks = [k for k in kinds if k.startswith("content_block_")]
    assert blocks[0] == "content_block_start" and blocks[-1] == "content_block_stop"
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 2


def test_anthropic_thinking_stop_sequences_and_count_tokens(backend: FakeBackend) -> None:
    client = anthropic_client(backend.say(THOUGHT))
    message = client.messages.create(model="m", max_tokens=50, messages=USER,
                                     stop_sequences=["sunny"])
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "The user wants weather.\n"
    assert message.content[1].text == "It is "
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "sunny")
    count = client.messages.count_tokens(model="m", messages=USER)
    assert count.input_tokens == message.usage.input_tokens == len(backend.calls[-1][0])


def test_anthropic_thinking_budget_ends_long_reasoning(backend: FakeBackend) -> None:
    backend.say("<think>" + "and so on " * 40 + "</think>done")
    message = anthropic_client(backend).messages.create(
        model="m", max_tokens=2000, messages=USER,
        thinking={"type": "enabled", "budget_tokens": 1024 // 64})
    assert message.stop_reason == "max_tokens" and message.content[0].type == "thinking"


@pytest.mark.parametrize(("body", "status", "kind"), [
    ({"model": "m", "messages": USER}, 400, "invalid_request_error"),
    ({"model": "other", "max_tokens": 5, "messages": USER}, 404, "not_found_error"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "AAAA"}}]}]}, 400, "invalid_request_error"),
])
def test_anthropic_errors_have_anthropics_shape(backend: FakeBackend, body: dict, status: int,
                                                kind: str) -> None:
    answer = http(backend.say("x")).post("/v1/messages", json=body)
    assert answer.status_code == status
    assert answer.json()["type"] == "error" and answer.json()["error"]["type"] == kind


def test_anthropic_clients_authenticate_with_x_api_key(backend: FakeBackend) -> None:
    client = http(backend.say("x"), api_key="sekret")
    body = {"model": "m", "max_tokens": 5, "messages": USER}
    assert client.post("/v1/messages", json=body).status_code == 401
    assert client.post("/v1/messages", json=body, headers={"x-api-key": "sekret"}).status_code \
        == 200
    assert client.post("/v1/messages", json=body).json()["type"] == "error"


# ----- OpenAI Responses ---------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_responses_tool_round_trip(backend: FakeBackend, stream: bool) -> None:
    client = openai_client(backend.say(THOUGHT.replace("It is sunny.", CALL), "Sunny."))
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    if stream:
        with client.responses.stream(model="m", input="Weather?", tools=tools) as events:
            response = events.get_final_response()
    else:
        response = client.responses.create(model="m", input="Weather?", tools=tools,
                                           instructions="Be brief.")
    assert [item.type for item in response.output] == ["reasoning", "function_call"]
    call = response.output[1]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    final = client.responses.create(model="m", tools=tools, input=[
        {"role": "user", "content": "Weather?"}, *[i.model_dump() for i in response.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert final.output_text == "Sunny." and final.status == "completed"
    assert "<tool_response>\nsunny\n</tool_response>" in last_prompt(backend)


def test_responses_refuse_previous_response_id(backend: FakeBackend) -> None:
    answer = http(backend).post("/v1/responses", json={"input": "hi",
                                                       "previous_response_id": "resp_1"})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "previous_response_id"


def test_responses_json_schema_and_max_output_tokens(backend: FakeBackend) -> None:
    client = openai_client(backend.say('{"city": "Paris", "more": "and more and more"}'))
    response = client.responses.create(model="m", input="w", max_output_tokens=4, text={
        "format": {"type": "json_schema", "name": "w", "schema": WEATHER}})
    assert "%json" in backend.calls[-1][1].grammar
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"


# ----- What every client relies on ----------------------------------------------------------

def test_cors_preflight_and_headers(backend: FakeBackend) -> None:
    client = http(backend.say("x"))
    preflight = client.options("/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})
    assert preflight.status_code in (200, 204)
    assert preflight.headers["access-control-allow-origin"] in ("*", "http://localhost:3000")
    assert "POST" in preflight.headers["access-control-allow-methods"]
    simple = client.get("/v1/models", headers={"Origin": "http://localhost:3000"})
    assert simple.headers["access-control-allow-origin"] == "*"
    strict = http(backend, cors_origins=("https://app.example",))
    refused = strict.get("/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in refused.headers


def test_models_by_id_and_head_requests(backend: FakeBackend) -> None:
    client = http(backend)
    assert client.get("/v1/models/fake/model").json()["id"] == "fake/model"
    missing = client.get("/v1/models/other-model")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    for path in ("/health", "/v1/models"):
        head = client.head(path)
        assert head.status_code == 200 and head.content == b""
