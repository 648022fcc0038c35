"""Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

What Claude Code and the official `anthropic` client send: a system prompt, text,
`tool_use` / `tool_result` and `thinking` content blocks, function tools with an
`input_schema`, `tool_choice` (auto, any, tool, none), `stop_sequences`, sampling and
`thinking`. The answer's blocks come in the model's order: thinking, text, tool_use. Errors
use Anthropic's shape (dnet/api/errors.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, ClassVar, Literal

from fastapi import Request
from fastapi.responses import Response
from pydantic import Field

from dnet.api.chat import (
    Conversation,
    FormatKind,
    OutputFormat,
    ToolChoice,
    ToolChoiceKind,
    count_prompt,
    prepare_chat,
)
from dnet.api.errors import ApiError, Surface
from dnet.api.generation import (
    Answer,
    Backend,
    FinishReason,
    Job,
    Options,
    Step,
    answer,
    check_model,
    make_job,
    steps,
)
from dnet.api.openai_chat import part_text
from dnet.api.output import Channel, Delta, ToolCall
from dnet.api.schema import Body
from dnet.api.streaming import (
    FAILURES,
    event_stream,
    first_item,
    off_the_loop,
    sse,
    stream_error,
    unless_disconnected,
)

log = logging.getLogger(__name__)

STOP_REASONS = {FinishReason.STOP: "end_turn", FinishReason.LENGTH: "max_tokens",
                FinishReason.TOOL_CALLS: "tool_use"}
MAX_STOP_SEQUENCES = 16




class AnthropicMessage(Body):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicTool(Body):
    type: str | None = None  # None or "custom": a client tool; others are Anthropic's own
    name: Annotated[str, Field(min_length=1, max_length=128)]
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class AnthropicToolChoice(Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class ThinkingConfig(Body):
    type: Literal["enabled", "disabled", "adaptive"]  # adaptive: the model's template decides
    budget_tokens: Annotated[int, Field(ge=1)] | None = None


class JsonOutputFormat(Body):
    type: Literal["json_schema"]
    schema_: Annotated[dict[str, Any], Field(alias="schema")]


class OutputConfig(Body):
    format: JsonOutputFormat | None = None  # structured output: the answer is this JSON


class CountTokensRequest(Body):
    model: str
    messages: Annotated[list[AnthropicMessage], Field(min_length=1)]
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None


class MessagesRequest(CountTokensRequest):
    unsupported: ClassVar[dict[str, str]] = {
        "mcp_servers": "the MCP connector is not available here; run the tools yourself"}
    max_tokens: Annotated[int, Field(ge=1)]
    stop_sequences: Annotated[list[Annotated[str, Field(min_length=1)]],
                              Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0  # Anthropic's default
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None  # who is asking, for the caller's records only

    def options(self) -> Options:
        return Options(max_tokens=self.max_tokens, temperature=self.temperature,
                       top_p=self.top_p, top_k=self.top_k,
                       stops=tuple(self.stop_sequences or ()))


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of blocks", param=where)
    return "".join(part_text(block, f"{where}[{j}]") for j, block in enumerate(content))


def _user(content: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """A user turn's blocks: tool results become `tool` messages, the text one user message."""
    out, texts = [], []
    for j, block in enumerate(content):
        if block.get("type") == "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                raise ApiError(400, f"{where}[{j}].tool_use_id is required")
            result = _text(block.get("content") or "", f"{where}[{j}].content")
            if block.get("is_error"):
                result = f"Error: {result}"
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": result})
        else:
            texts.append(part_text(block, f"{where}[{j}]"))
    if texts:
        out.append({"role": "user", "content": "".join(texts)})
    return out


def _assistant(content: list[dict[str, Any]], where: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    calls, reasoning = [], []
    for j, block in enumerate(content):
        kind = block.get("type")
        if kind == "tool_use":
            if not isinstance(block.get("input", {}), dict) or not block.get("name"):
                raise ApiError(400, f"{where}[{j}]: a tool_use needs a name and an input object")
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block["name"], "arguments": block.get("input", {})}})
        elif kind == "thinking":
            reasoning.append(str(block.get("thinking", "")))
        elif kind == "redacted_thinking":
            raise ApiError(400, f"{where}[{j}]: redacted_thinking blocks cannot be read here")
        else:
            message["content"] += part_text(block, f"{where}[{j}]")
    if calls:
        message["tool_calls"] = calls
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    return message


def conversation_of(body: CountTokensRequest) -> Conversation:
    messages: list[dict[str, Any]] = []
    if body.system:
        messages.append({"role": "system", "content": _text(body.system, "system")})
    for i, message in enumerate(body.messages):
        where = f"messages[{i}].content"
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
        elif message.role == "user":
            messages += _user(message.content, where)
        else:
            messages.append(_assistant(message.content, where))
    tools = None
    if body.tools:
        for i, tool in enumerate(body.tools):
            if tool.type not in (None, "custom"):
                raise ApiError(400, f"tools[{i}]: Anthropic's server tools ({tool.type}) are "
                                    "not available; define client tools with an input_schema")
        tools = [{"type": "function", "function": {
            "name": t.name, "description": t.description or "",
            "parameters": t.input_schema or {"type": "object"}}} for t in body.tools]
    choice, parallel = ToolChoice(), True
    if body.tool_choice is not None:
        kinds = {"auto": ToolChoiceKind.AUTO, "any": ToolChoiceKind.REQUIRED,
                 "tool": ToolChoiceKind.NAMED, "none": ToolChoiceKind.NONE}
        choice = ToolChoice(kinds[body.tool_choice.type], body.tool_choice.name)
        parallel = not body.tool_choice.disable_parallel_tool_use
    kwargs = {}
    if body.thinking is not None and body.thinking.type != "adaptive":
        kwargs["enable_thinking"] = body.thinking.type == "enabled"
    fmt = OutputFormat()
    if body.output_config is not None and body.output_config.format is not None:
        fmt = OutputFormat(FormatKind.JSON_SCHEMA, body.output_config.format.schema_,
                           param="output_config.format.schema")
    return Conversation(messages=messages, tools=tools, tool_choice=choice,
                        parallel_tool_calls=parallel, output_format=fmt, template_kwargs=kwargs)


def check_thinking(body: MessagesRequest) -> int | None:
    """The thinking budget in tokens, enforced as a limit on reasoning tokens."""
    thinking = body.thinking
    if thinking is None or thinking.type != "enabled":
        return None
    if thinking.budget_tokens is None:
        raise ApiError(400, "thinking.budget_tokens is required when thinking is enabled")
    if thinking.budget_tokens >= body.max_tokens:
        raise ApiError(400, "thinking.budget_tokens must be less than max_tokens")
    return thinking.budget_tokens


def _arguments(call: ToolCall) -> dict[str, Any]:
    try:
        value = json.loads(call.arguments)
    except json.JSONDecodeError:
        return {"arguments": call.arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def stop_reason(result_finish: FinishReason, stop_sequence: str | None) -> str:
    return "stop_sequence" if stop_sequence else STOP_REASONS[result_finish]


def _block(part: Delta | ToolCall) -> dict[str, Any]:
    if isinstance(part, ToolCall):
        return {"type": "tool_use", "id": part.id, "name": part.name, "input": _arguments(part)}
    if part.channel is Channel.REASONING:
        return {"type": "thinking", "thinking": part.text, "signature": ""}
    return {"type": "text", "text": part.text}


def message_response(model: str, job: Job, result: Answer) -> dict[str, Any]:
    return {"id": f"msg_{job.id}", "type": "message", "role": "assistant", "model": model,
            "content": [_block(part) for part in result.parts],
            "stop_reason": stop_reason(result.finish, result.stop_sequence),
            "stop_sequence": result.stop_sequence,
            "usage": {**input_usage(result.prompt_tokens, result.cached_tokens),
                      "output_tokens": result.completion_tokens}}


def input_usage(prompt_tokens: int, cached_tokens: int) -> dict[str, int]:
    """Anthropic's input counts: `input_tokens` are those after the last cache read, so the
    prompt is input_tokens + cache_read_input_tokens (dnet's prefix cache writes as a side
    effect of prefill: nothing is billed as a cache write)."""
    return {"input_tokens": prompt_tokens - cached_tokens,
            "cache_read_input_tokens": cached_tokens, "cache_creation_input_tokens": 0}


class MessageEvents:
    """Anthropic's event sequence for one answer's steps."""

    def __init__(self, model: str, job: Job) -> None:
        self.model, self.job = model, job
        self.index = -1
        self.open: str | None = None  # the kind of the block being written
        self.output_tokens = 0
        self.started = False

    def _start(self, block: dict[str, Any]) -> list[str]:
        events = self._close()
        self.index += 1
        self.open = block["type"]
        events.append(sse({"type": "content_block_start", "index": self.index,
                           "content_block": block}, "content_block_start"))
        return events

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [sse({"type": "content_block_stop", "index": self.index}, "content_block_stop")]

    def _delta(self, delta: dict[str, Any]) -> str:
        return sse({"type": "content_block_delta", "index": self.index, "delta": delta},
                   "content_block_delta")

    def part(self, part: Delta | ToolCall) -> list[str]:
        if isinstance(part, ToolCall):
            return [*self._start({"type": "tool_use", "id": part.id, "name": part.name,
                                  "input": {}}),
                    self._delta({"type": "input_json_delta", "partial_json": part.arguments}),
                    *self._close()]
        if part.channel is Channel.REASONING:
            events = [] if self.open == "thinking" else self._start(
                {"type": "thinking", "thinking": "", "signature": ""})
            return [*events, self._delta({"type": "thinking_delta", "thinking": part.text})]
        events = [] if self.open == "text" else self._start({"type": "text", "text": ""})
        return [*events, self._delta({"type": "text_delta", "text": part.text})]

    def start(self, cached_tokens: int) -> list[str]:
        """message_start, sent with the answer's first step (which says what was cached)."""
        self.started = True
        message = {"id": f"msg_{self.job.id}", "type": "message", "role": "assistant",
                   "model": self.model, "content": [], "stop_reason": None,
                   "stop_sequence": None,
                   "usage": {**input_usage(len(self.job.prompt), cached_tokens),
                             "output_tokens": 0}}
        return [sse({"type": "message_start", "message": message}, "message_start"),
                sse({"type": "ping"}, "ping")]

    def step(self, step: Step) -> list[str]:
        events = [] if self.started else self.start(step.cached_tokens)
        self.output_tokens += len(step.tokens)
        events += [e for part in step.parts for e in self.part(part)]
        if step.finish is not None:
            events += self._close()
            delta = {"stop_reason": stop_reason(step.finish, step.stop_sequence),
                     "stop_sequence": step.stop_sequence}
            events.append(sse({"type": "message_delta", "delta": delta,
                               "usage": {"output_tokens": self.output_tokens}}, "message_delta"))
            events.append(sse({"type": "message_stop"}, "message_stop"))
        return events

    async def events(self, source: AsyncIterator[Step]) -> AsyncIterator[str]:
        try:
            async for step in source:
                for event in self.step(step):
                    yield event
        except FAILURES as exc:
            log.warning("message %s failed mid-stream: %s", self.job.id, exc)
            yield sse(stream_error(exc).body(Surface.ANTHROPIC), "error")


def _job(backend: Backend, body: MessagesRequest, escape: bool) -> Job:
    check_model(backend, body.model)
    budget = check_thinking(body)
    prepared = prepare_chat(backend.tokenizer, conversation_of(body), escape=escape)
    job = make_job(backend, body.options(), prepared.prompt, output=prepared.output,
                   grammar=prepared.grammar)
    job.reasoning_budget = budget
    return job


async def serve(request: Request, backend: Backend, body: MessagesRequest, *,
                escape: bool) -> Response | dict[str, Any]:
    job = await off_the_loop(_job, backend, body, escape)
    if body.stream:
        _, source = await first_item(steps(backend, job))
        return event_stream(MessageEvents(backend.model_name, job).events(source))
    result = await unless_disconnected(request, answer(backend, job))
    return message_response(backend.model_name, job, result)


def count_tokens(backend: Backend, body: CountTokensRequest, *, escape: bool) -> dict[str, int]:
    check_model(backend, body.model)
    return {"input_tokens": count_prompt(backend.tokenizer, conversation_of(body),
                                         escape=escape)}
