"""gpt-oss's harmony format, in-process: recognising it from the vocabulary, parsing scripted
outputs into reasoning, content and tool calls however the text arrives, preparing messages
for gpt-oss's template, and the grammars that force a call or JSON into the right channel
(checked with llguidance on gpt-oss's real tokenizer)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import jsonschema
import mlx.core as mx
import pytest
from llguidance import LLMatcher

from dnet.api import constraints
from dnet.api.harmony import HarmonyParser, parse_header, template_messages
from dnet.api.output import Channel, Delta, Part, ToolCall
from dnet.proto import dnet_ring_pb2 as pb
from dnet.sampling import TokenSampler, grammar_tokenizer
from tests.harmony_support import (
    CALL,
    CHANNEL,
    CONSTRAIN,
    END,
    ENDOFTEXT,
    GPTOSS_VOCAB,
    MESSAGE,
    RETURN,
    START,
)

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
             "required": ["zone"], "additionalProperties": False}}}]
ANALYSIS = "<|channel|>analysis<|message|>The user wants the weather.<|end|><|start|>assistant"
CALL_TEXT = ('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
             '{"city": "Paris", "unit": "celsius"}')
ARGS = '{"city": "Paris", "unit": "celsius"}'


def merged(parts: list[Part]) -> list[Part]:
    out: list[Part] = []
    for part in parts:
        last = out[-1] if out else None
        if isinstance(part, Delta) and isinstance(last, Delta) and last.channel is part.channel:
            out[-1] = Delta(part.channel, last.text + part.text)
        else:
            out.append(part)
    return out


def whole(text: str) -> list[str]:
    return [text]


def by_character(text: str) -> list[str]:
    return list(text)


def at_random(text: str) -> list[str]:
    rng = random.Random(len(text))
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, len(text) // 3)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


CHUNKINGS = [whole, by_character, at_random]


def parse(text: str, chunking: Callable[[str], list[str]], *, parse_tools: bool = True
          ) -> list[Part]:
    parser = HarmonyParser(parse_tools)
    parts = [part for chunk in chunking(text) for part in parser.feed(chunk)]
    return merged(parts + parser.finish())


def calls_of(parts: list[Part]) -> list[tuple[str, str]]:
    return [(p.name, p.arguments) for p in parts if isinstance(p, ToolCall)]


# ----- Parsing --------------------------------------------------------------------------------

@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_analysis_is_reasoning_and_final_is_content(chunking) -> None:
    text = ANALYSIS + "<|channel|>final<|message|>It is sunny in Paris."
    assert parse(text, chunking) == [Delta(Channel.REASONING, "The user wants the weather."),
                                     Delta(Channel.CONTENT, "It is sunny in Paris.")]


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("call", [
    CALL_TEXT,  # the recipient after the channel, as gpt-oss writes its calls
    # ... and before it, as gpt-oss's template renders earlier calls
    '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>' + ARGS,
    # ... and on the analysis channel, where gpt-oss sometimes puts a call
    '<|channel|>analysis to=functions.get_weather code<|message|>' + ARGS,
])
def test_a_message_to_a_function_is_a_tool_call(chunking, call: str) -> None:
    parts = parse(ANALYSIS + call, chunking)  # <|call|> is an end token: it never arrives
    assert parts[0] == Delta(Channel.REASONING, "The user wants the weather.")
    assert calls_of(parts) == [("get_weather", ARGS)] and len(parts) == 2


@pytest.mark.parametrize("chunking", CHUNKINGS)
def test_a_preamble_is_content_and_each_call_has_its_own_id(chunking) -> None:
    text = ("<|channel|>commentary<|message|>Checking two things.<|end|>"
            f"<|start|>assistant{CALL_TEXT}<|call|>"
            '<|start|>assistant<|channel|>commentary to=functions.get_time <|constrain|>json'
            '<|message|>{"zone": "UTC"}')
    parts = parse(text, chunking)
    assert parts[0] == Delta(Channel.CONTENT, "Checking two things.")
    assert calls_of(parts) == [("get_weather", ARGS), ("get_time", '{"zone": "UTC"}')]
    assert len({p.id for p in parts if isinstance(p, ToolCall)}) == 2


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize(("text", "expected"), [
    # Arguments that are not JSON: the message comes back as text, never lost.
    ("<|channel|>commentary to=functions.get_weather json<|message|>{city: Paris",
     "<|channel|>commentary to=functions.get_weather json<|message|>{city: Paris"),
    # A model that does not speak harmony: its text is content, short or long, or ended.
    ("Just some text.", "Just some text."),
    ("word " * 80, "word " * 80),
    ("Just some text.<|end|>", "Just some text."),
    # A call to a tool that was not offered (gpt-oss's built-in python) is text.
    ("<|channel|>analysis to=python code<|message|>print(1)",
     "<|channel|>analysis to=python code<|message|>print(1)"),
    # Text in a body that looks like the start of a marker is text.
    ("<|channel|>final<|message|>a <| b <", "a <| b <"),
])
def test_what_is_not_a_call_comes_back_as_content(chunking, text: str, expected: str) -> None:
    assert parse(text, chunking) == [Delta(Channel.CONTENT, expected)]


def test_without_tools_a_call_is_text() -> None:
    parts = parse(CALL_TEXT, whole, parse_tools=False)
    assert parts == [Delta(Channel.CONTENT, CALL_TEXT)]


@pytest.mark.parametrize("cut", ["<|channel|>fin", "", " to=functions.get_w"])
def test_an_answer_cut_short_in_its_header_returns_no_markup(cut: str) -> None:
    assert parse(ANALYSIS + cut, whole) == [
        Delta(Channel.REASONING, "The user wants the weather.")]


def test_the_parser_says_when_it_reads_reasoning() -> None:
    parser = HarmonyParser(parse_tools=True)
    seen = []
    for piece in ["<|channel|>", "analysis", "<|message|>", "Hmm", "<|end|>", "<|start|>",
                  "assistant", "<|channel|>", "final", "<|message|>", "Yes"]:
        parser.feed(piece)
        seen.append(parser.reasoning)
    assert seen == [False, True, True, True, False, False, False, False, False, False, False]


def test_headers_name_channel_and_recipient() -> None:
    header = parse_header("assistant to=functions.get_weather<|channel|>commentary json")
    assert (header.channel.value, header.function) == ("commentary", "get_weather")
    header = parse_header("<|channel|>commentary to=functions.f <|constrain|>json")
    assert (header.channel.value, header.function) == ("commentary", "f")
    header = parse_header("<|channel|>analysis to=python code")
    assert (header.channel.value, header.recipient, header.function) == ("analysis", "python",
                                                                         None)
    assert parse_header("<|channel|>final").recipient is None


# ----- Recognition and end tokens -------------------------------------------------------------

def test_the_vocabulary_says_harmony_and_its_end_tokens_stop(gptoss_tokenizer,
                                                             qwen3_tokenizer) -> None:
    harmony = gptoss_tokenizer.harmony
    assert (harmony.start, harmony.end, harmony.message, harmony.channel, harmony.constrain,
            harmony.call, harmony.return_) == (START, END, MESSAGE, CHANNEL, CONSTRAIN, CALL,
                                               RETURN)
    assert {RETURN, CALL, ENDOFTEXT} <= gptoss_tokenizer.eos_token_ids
    assert gptoss_tokenizer.tools is None and gptoss_tokenizer.think is None  # mlx-lm's view
    assert qwen3_tokenizer.harmony is None


# ----- Messages for gpt-oss's template --------------------------------------------------------

def _call(call_id: str, name: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": {}}}


def test_each_call_is_its_own_message_followed_by_its_result() -> None:
    messages = [{"role": "user", "content": "both"},
                {"role": "assistant", "content": "", "reasoning_content": "Two calls.",
                 "tool_calls": [_call("a", "get_weather"), _call("b", "get_time")]},
                {"role": "tool", "tool_call_id": "b", "content": "noon"},
                {"role": "tool", "tool_call_id": "a", "content": "sunny"}]
    out = template_messages(messages)
    assert [(m["role"], m.get("tool_call_id"), [c["id"] for c in m.get("tool_calls", [])])
            for m in out] == [("user", None, []), ("assistant", None, ["a"]),
                              ("tool", "a", []), ("assistant", None, ["b"]), ("tool", "b", [])]
    assert out[1]["reasoning_content"] == "Two calls." and "reasoning_content" not in out[3]


def test_content_beside_thinking_on_a_call_joins_the_thinking() -> None:
    message = {"role": "assistant", "content": "Let me check.", "reasoning_content": "Hmm.",
               "tool_calls": [_call("a", "get_weather")]}
    (out,) = template_messages([message])
    assert (out["reasoning_content"], out["content"]) == ("Hmm.\n\nLet me check.", "")


# ----- Grammars -------------------------------------------------------------------------------

def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


@pytest.mark.parametrize(("kind", "accepted", "refused"), [
    ("call", [CALL_TEXT, ANALYSIS + CALL_TEXT,
              ANALYSIS + '<|channel|>commentary to=functions.get_time <|constrain|>json'
                         '<|message|>{"zone": "CET"}'],
     ["<|channel|>final<|message|>Sunny.",
      '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"zone": 1}',
      '<|channel|>commentary to=functions.nope <|constrain|>json<|message|>{}']),
    ("json", ['<|channel|>final<|message|>{"city": "Paris", "unit": "celsius"}',
              ANALYSIS + '<|channel|>final<|message|>{"city": "Rome", "unit": "fahrenheit"}'],
     ['{"city": "Paris", "unit": "celsius"}',
      '<|channel|>final<|message|>{"city": "Paris"}',
      CALL_TEXT]),
])
def test_grammars_put_the_constrained_text_in_its_channel(
        gptoss_vocab_model: Path, gptoss_tokenizer, kind: str, accepted: list[str],
        refused: list[str]) -> None:
    grammar = (constraints.tool_call_grammar(gptoss_tokenizer, [], "normal", TOOLS, True)
               if kind == "call" else
               constraints.json_grammar(gptoss_tokenizer, [], "normal", WEATHER, "schema"))
    tokenizer = grammar_tokenizer(gptoss_vocab_model, GPTOSS_VOCAB)
    for text, ok in [*((t, True) for t in accepted), *((t, False) for t in refused)]:
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        ids = _ids(gptoss_tokenizer, text)
        valid = matcher.validate_tokens(ids) == len(ids)
        if ok:  # complete: nothing but an end token may follow
            assert valid and all(matcher.consume_token(i) for i in ids) and \
                matcher.is_stopped(), text
        else:
            assert not valid, text


def _decode(model_dir: Path, tokenizer, grammar: str, max_tokens: int = 200) -> str:
    """Random logits under the grammar, as the tail samples them, for a model that does not
    reason first: every token that begins "analysis" is pushed down."""
    vocab = tokenizer._wrapper.get_vocab()
    no_analysis = mx.array([i for piece, i in vocab.items() if piece and
                            "analysis".startswith(piece)])
    sampler = TokenSampler(pb.SamplingParams(top_p=1.0, max_tokens=max_tokens, grammar=grammar),
                           GPTOSS_VOCAB, lambda: grammar_tokenizer(model_dir, GPTOSS_VOCAB))
    tokens: list[int] = []
    for step in range(max_tokens):
        logits = mx.random.normal((1, GPTOSS_VOCAB), key=mx.random.key(step))
        logits[0, no_analysis] = -1e9
        token, logprobs = sampler.sample(logits)
        sample = sampler.describe(token, logprobs)
        tokens.append(sample.token)
        if sample.grammar_done:
            return b"".join(tokenizer.token_bytes(t) for t in tokens).decode()
    raise AssertionError(f"the grammar did not complete in {max_tokens} tokens")


# Sampling a whole call under gpt-oss's 200k-token vocabulary takes seconds: slow tier (the
# grammars' channels are checked in the fast tier above).
@pytest.mark.slow
def test_random_logits_under_harmony_grammars_give_a_valid_call_and_valid_json(
        gptoss_vocab_model: Path, gptoss_tokenizer) -> None:
    grammar = constraints.tool_call_grammar(gptoss_tokenizer, [], "normal", TOOLS, True)
    text = _decode(gptoss_vocab_model, gptoss_tokenizer, grammar)
    (call,) = [p for p in parse(text, whole) if isinstance(p, ToolCall)]
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.name]
    jsonschema.validate(json.loads(call.arguments), schema)
    grammar = constraints.json_grammar(gptoss_tokenizer, [], "normal", WEATHER, "schema")
    (answer,) = parse(_decode(gptoss_vocab_model, gptoss_tokenizer, grammar), whole)
    assert answer.channel is Channel.CONTENT
    jsonschema.validate(json.loads(answer.text), WEATHER)
