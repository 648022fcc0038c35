"""Grammars for constrained output: JSON schemas and guaranteed tool calls.

The HTTP layer writes an llguidance grammar (Lark syntax with embedded `%json` schemas) and
the tail's sampler masks every token that would leave it (`dnet/sampling.py`). Why
llguidance: a Rust matcher that computes a 150k-token mask in about 0.1 ms with no
preprocessing of the vocabulary per schema, abi3 wheels for Linux x86-64 and macOS arm64
without torch (xgrammar needs torch, outlines-core compiles a regex index per schema, which
takes seconds on large vocabularies), and a bitmask that applies to MLX arrays as to any
other. A schema feature it does not implement is refused here with a 400 that names it.

A thinking model may think first: the grammar lets the think block through untouched and
constrains what follows it.
"""

from __future__ import annotations

import json
from typing import Any

from llguidance import LLMatcher

from dnet.api.errors import ApiError
from dnet.api.tokenizer import ChatTokenizer, Markers

# JSON whitespace the model may choose between tokens, bounded so that a model that prefers
# whitespace cannot run out its token budget on it.
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,8}"}
TOOL_FORMATS_WITH_JSON_CALLS = ("json_tools",)  # <tool_call>{"name", "arguments"}</tool_call>
THINK_TAIL_TOKENS = 16  # a template that turned thinking off closes a think block this close


def check_schema(schema: Any, param: str) -> None:
    """ApiError (400) naming what llguidance cannot enforce in the schema."""
    if not isinstance(schema, dict):
        raise ApiError(400, "a JSON schema must be an object", param=param)
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema)
    except ValueError as exc:
        raise ApiError(400, f"invalid JSON schema: {exc}", param=param) from exc
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise ApiError(400, f"structured output does not support this schema: {error}",
                       param=param)


def _json_rule(schema: dict) -> str:
    options = {**JSON_OPTIONS, **schema.get("x-guidance", {})}
    return "%json " + json.dumps({**schema, "x-guidance": options})


def _atom(tokenizer: ChatTokenizer, text: str, ids: tuple[int, ...]) -> str:
    """A marker in the grammar: its token when it is one added token, else its text."""
    if len(ids) == 1 and ids[0] in tokenizer.added_token_ids:
        return f"<[{ids[0]}]>"
    return json.dumps(text)


def _think_rules(tokenizer: ChatTokenizer, prompt: list[int], state: str) -> tuple[str, list[str]]:
    """The grammar's prefix for a thinking model's reasoning, and the rules it needs."""
    think: Markers | None = tokenizer.think
    if think is None:
        return "", []
    end = _atom(tokenizer, think.end, think.end_ids)
    if end.startswith("<["):
        body = [f"think_body: /(?s:.*)/ {end} /[ \\n]{{0,4}}/"]
    else:
        body = [f"think_body[lazy]: /(?s:.*){_regex(think.end)}[ \\n]{{0,4}}/"]
    if state == "reasoning":
        return "think_body ", body
    closed = tokenizer.rfind(prompt, think.end_ids, start=len(prompt) - THINK_TAIL_TOKENS)
    if closed >= 0:
        return "", []
    start = _atom(tokenizer, think.start, think.start_ids)
    return "think? ", [f"think: {start} think_body", *body]


def _regex(text: str) -> str:
    return "".join(f"\\{c}" if not c.isalnum() else c for c in text)


def _finish(lines: list[str], param: str) -> str:
    lark = "\n".join(lines) + "\n"
    error = LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(lark))
    if error:
        raise ApiError(400, f"structured output does not support this request: {error}",
                       param=param)
    return lark


def json_grammar(tokenizer: ChatTokenizer, prompt: list[int], state: str,
                 schema: dict, param: str) -> str:
    """The answer is one JSON value valid against `schema` (after any reasoning)."""
    check_schema(schema, param)
    prefix, rules = _think_rules(tokenizer, prompt, state)
    return _finish([f"start: {prefix}answer", f"answer: {_json_rule(schema)}", *rules], param)


def call_schema(tool: dict) -> dict:
    """What one call of an OpenAI function tool looks like in a `json_tools` model's output."""
    function = tool["function"]
    arguments = function.get("parameters") or {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": function["name"]},
                                             "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_call_grammar(tokenizer: ChatTokenizer, prompt: list[int], state: str,
                      tools: list[dict], parallel: bool) -> str:
    """The answer is one tool call (or several, when parallel) of the given tools, with
    arguments valid against each tool's schema, in the model's own tool-call format."""
    param = "tool_choice"
    fmt = tokenizer.tools
    if fmt is None or fmt.name not in TOOL_FORMATS_WITH_JSON_CALLS:
        name = fmt.name if fmt else "none"
        raise ApiError(400, f"tool_choice 'required' or a named function needs a model whose "
                            f"tool calls are JSON ({', '.join(TOOL_FORMATS_WITH_JSON_CALLS)}); "
                            f"this model's format is {name}", param=param)
    for i, tool in enumerate(tools):
        check_schema(tool["function"].get("parameters") or {"type": "object"},
                     f"tools[{i}].function.parameters")
    schemas = [call_schema(tool) for tool in tools]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    markers = fmt.markers
    start = _atom(tokenizer, markers.start, markers.start_ids)
    end = _atom(tokenizer, markers.end, markers.end_ids)
    prefix, rules = _think_rules(tokenizer, prompt, state)
    calls = 'call ("\\n" call)*' if parallel else "call"
    return _finish([f"start: {prefix}{calls}", f'call: {start} "\\n" fn "\\n" {end}',
                    f"fn: {_json_rule(schema)}", *rules], param)
