"""gpt-oss's harmony format on every API surface, in-process, through the official openai and
anthropic clients: gpt-oss's real tokenizer and a template of its template's structure
(tests/harmony_support.py), behind a backend that answers scripted harmony outputs. The
analysis channel comes back as reasoning, the final channel as content, a message to
`functions.NAME` as a tool call; the history goes back to the template as Hugging Face's
`apply_chat_template` takes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.api_support import FakeBackend, anthropic_client, http, last_prompt, openai_client
from tests.harmony_support import CALL, ENDOFTEXT, GPTOSS_VOCAB, RETURN

pytestmark = pytest.mark.usefixtures("no_warnings")

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                            "parameters": WEATHER}}]
THOUGHT = "The user wants the weather."
ANALYSIS = f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant"
ARGS = '{"city": "Paris"}'
CALLS = ANALYSIS + ("<|channel|>commentary to=functions.get_weather <|constrain|>json"
                    f"<|message|>{ARGS}")
ANSWER = ANALYSIS + "<|channel|>final<|message|>It is sunny in Paris."
USER = [{"role": "user", "content": "Weather in Paris?"}]
# What gpt-oss's template renders for the call and its result in the next prompt.
RENDERED_CALL = (f"<|start|>assistant<|channel|>analysis<|message|>{THOUGHT}<|end|>"
                 "<|start|>assistant to=functions.get_weather<|channel|>commentary json"
                 f"<|message|>{ARGS}<|call|>")
RENDERED_RESULT = ("<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
                   '"sunny, 24 C"<|end|><|start|>assistant')




class Harmony(FakeBackend):
    def call(self, *texts: str) -> Harmony:
        """Answers as gpt-oss ends them: each text, then its end token (which is not text):
        `<|call|>` after a tool call, `<|return|>` after a final answer."""
        self.script = [self.tokenizer.encode(t) + [CALL if "to=functions." in t else RETURN]
                       for t in texts]
        return self


@pytest.fixture
def backend(gptoss_tokenizer) -> Harmony:
    return Harmony(gptoss_tokenizer, vocab_size=GPTOSS_VOCAB)










# ----- OpenAI chat completions --------------------------------------------------------------

def test_analysis_is_reasoning_content_and_final_is_content(backend: Harmony) -> None:
    client = openai_client(backend.call(ANSWER))
    answer = client.chat.completions.create(model="m", messages=USER, max_tokens=60)
    message = answer.choices[0].message
    assert (message.content, message.model_extra["reasoning_content"]) == (
        "It is sunny in Paris.", THOUGHT)
    assert answer.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="m", messages=USER, max_tokens=60,
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "It is sunny in Paris."
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == \
        THOUGHT
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_openai_tool_round_trip(backend: Harmony, gptoss_vocab_model: Path,
                                stream: bool) -> None:
    client = openai_client(backend.call(CALLS, ANSWER))
    kwargs = {"model": "m", "tools": TOOLS, "max_tokens": 80}
    if stream:
        chunks = list(client.chat.completions.create(messages=USER, stream=True, **kwargs))
        calls = [c for chunk in chunks for c in chunk.choices[0].delta.tool_calls or []]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content")
                            or "" for c in chunks)
        call_id, name, arguments = calls[0].id, calls[0].function.name, calls[0].function.arguments
    else:
        answer = client.chat.completions.create(messages=USER, **kwargs)
        assert answer.choices[0].finish_reason == "tool_calls"
        message = answer.choices[0].message
        assert message.content is None
        reasoning = message.model_extra["reasoning_content"]
        (call,) = message.tool_calls
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
    assert (name, json.loads(arguments), reasoning) == ("get_weather", {"city": "Paris"},
                                                        THOUGHT)
    history = [*USER, {"role": "assistant", "content": None, "reasoning_content": reasoning,
                       "tool_calls": [{"id": call_id, "type": "function", "function": {
                           "name": name, "arguments": arguments}}]},
               {"role": "tool", "tool_call_id": call_id, "content": "sunny, 24 C"}]
    final = client.chat.completions.create(messages=history, **kwargs)
    assert final.choices[0].message.content == "It is sunny in Paris."
    prompt = last_prompt(backend)
    assert prompt.endswith(RENDERED_CALL + RENDERED_RESULT)
    # Exactly Hugging Face's rendering of the messages gpt-oss's template takes.
    reference = AutoTokenizer.from_pretrained(gptoss_vocab_model).apply_chat_template(
        [*USER, {"role": "assistant", "content": "", "thinking": THOUGHT, "tool_calls": [
            {"id": call_id, "type": "function", "function": {
                "name": "get_weather", "arguments": {"city": "Paris"}}}]},
         {"role": "tool", "tool_call_id": call_id, "content": "sunny, 24 C"}],
        tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert backend.calls[-1][0] == reference
    assert final.usage.prompt_tokens == len(reference)


def test_two_calls_in_one_message_each_meet_their_result(backend: Harmony) -> None:
    client = openai_client(backend.call(ANSWER))
    calls = [{"id": f"call_{city}", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": city})}}
        for city in ("Paris", "Rome")]
    client.chat.completions.create(model="m", tools=TOOLS, max_tokens=20, messages=[
        *USER, {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_Rome", "content": "rain"},
        {"role": "tool", "tool_call_id": "call_Paris", "content": "sun"}])
    prompt = last_prompt(backend)
    paris = prompt.index('"city": "Paris"')
    assert paris < prompt.index('"sun"') < prompt.index('"city": "Rome"') < \
        prompt.index('"rain"')


def test_a_call_with_both_content_and_reasoning_is_accepted(backend: Harmony) -> None:
    answer = http(backend.call(ANSWER)).post("/v1/chat/completions", json={"tools": TOOLS,
        "messages": [*USER, {"role": "assistant", "content": "Let me check.",
                             "reasoning_content": "Hmm.", "tool_calls": [
                                 {"id": "c1", "type": "function", "function": {
                                     "name": "get_weather", "arguments": ARGS}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "sun"}]})
    assert answer.status_code == 200, answer.text  # gpt-oss's template refuses both at once
    assert "<|channel|>analysis<|message|>Hmm.\n\nLet me check.<|end|>" in last_prompt(backend)


def test_a_call_without_tools_offered_is_text(backend: Harmony) -> None:
    answer = openai_client(backend.call(CALLS)).chat.completions.create(
        model="m", messages=USER, max_tokens=60)
    message = answer.choices[0].message
    assert message.tool_calls is None and "to=functions.get_weather" in message.content
    assert answer.choices[0].finish_reason == "stop"


def test_every_end_token_gpt_oss_declares_stops_the_answer(backend: Harmony) -> None:
    http(backend.call(ANSWER)).post("/v1/chat/completions", json={"messages": USER})
    assert {RETURN, CALL, ENDOFTEXT} <= set(backend.calls[-1][1].eos_token_ids)


@pytest.mark.parametrize(("body", "effort"), [
    ({"reasoning_effort": "high"}, "high"),
    ({"reasoning_effort": "none"}, "low"),  # gpt-oss cannot turn reasoning off
    ({"chat_template_kwargs": {"reasoning_effort": "low"}, "reasoning_effort": "high"}, "low"),
    ({}, "medium"),
])
def test_reasoning_effort_reaches_the_template(backend: Harmony, body: dict,
                                               effort: str) -> None:
    http(backend.call(ANSWER)).post("/v1/chat/completions", json={"messages": USER, **body})
    assert f"Reasoning: {effort}\n" in last_prompt(backend)


def test_forced_calls_and_json_are_constrained_in_their_channel(backend: Harmony) -> None:
    client = http(backend.call(CALLS))
    named = {"type": "function", "function": {"name": "get_weather"}}
    for extra, expected in (({"tools": TOOLS, "tool_choice": "required"}, "to=functions."),
                            ({"tools": TOOLS, "tool_choice": named}, "to=functions.get_weather"),
                            ({"response_format": {"type": "json_object"}}, '"final"')):
        answer = client.post("/v1/chat/completions", json={"messages": USER, **extra})
        assert answer.status_code == 200, answer.text
        grammar = backend.calls[-1][1].grammar
        assert "%json" in grammar and expected in grammar and "analysis" in grammar


# ----- Anthropic Messages -------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_thinking_and_tool_use_round_trip(backend: Harmony, stream: bool) -> None:
    client = anthropic_client(backend.call(CALLS, ANSWER))
    tools = [{"name": "get_weather", "description": "Weather.", "input_schema": WEATHER}]
    kwargs = {"model": "m", "max_tokens": 80, "tools": tools}
    if stream:
        with client.messages.stream(messages=USER, **kwargs) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(messages=USER, **kwargs)
    assert [b.type for b in message.content] == ["thinking", "tool_use"]
    assert message.content[0].thinking == THOUGHT and message.stop_reason == "tool_use"
    use = message.content[1]
    assert (use.name, use.input) == ("get_weather", {"city": "Paris"})
    final = client.messages.create(messages=[
        *USER, {"role": "assistant", "content": message.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": "sunny, 24 C"}]}], **kwargs)
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[1].text == "It is sunny in Paris." and final.stop_reason == "end_turn"
    assert last_prompt(backend).endswith(RENDERED_CALL + RENDERED_RESULT)


def test_anthropic_thinking_disabled_asks_for_low_effort(backend: Harmony) -> None:
    anthropic_client(backend.call(ANSWER)).messages.create(
        model="m", max_tokens=40, messages=USER, thinking={"type": "disabled"})
    assert "Reasoning: low\n" in last_prompt(backend)


def test_anthropic_thinking_budget_ends_a_long_analysis(backend: Harmony) -> None:
    backend.call("<|channel|>analysis<|message|>" + "and so on " * 40 + "<|end|><|start|>"
                 "assistant<|channel|>final<|message|>done")
    message = anthropic_client(backend).messages.create(
        model="m", max_tokens=2000, messages=USER,
        thinking={"type": "enabled", "budget_tokens": 16})
    assert message.stop_reason == "max_tokens"
    assert [b.type for b in message.content] == ["thinking"]
    assert message.usage.output_tokens <= 16 + 3  # the header's tokens, then 16 of thinking


# ----- OpenAI Responses ---------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_responses_reasoning_and_function_call_round_trip(backend: Harmony,
                                                          stream: bool) -> None:
    client = openai_client(backend.call(CALLS, ANSWER))
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    if stream:
        with client.responses.stream(model="m", input="Weather in Paris?", tools=tools,
                                     reasoning={"effort": "high"}) as events:
            response = events.get_final_response()
    else:
        response = client.responses.create(model="m", input="Weather in Paris?", tools=tools,
                                           reasoning={"effort": "high"})
    assert "Reasoning: high\n" in last_prompt(backend)
    assert [item.type for item in response.output] == ["reasoning", "function_call"]
    assert response.output[0].content[0].text == THOUGHT
    call = response.output[1]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    final = client.responses.create(model="m", tools=tools, input=[
        {"role": "user", "content": "Weather in Paris?"},
        *[item.model_dump() for item in response.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 24 C"}])
    assert final.output_text == "It is sunny in Paris." and final.status == "completed"
    assert last_prompt(backend).endswith(RENDERED_CALL + RENDERED_RESULT)
