"""OpenAI chat completions: `POST /v1/chat/completions`, with tools, reasoning and JSON output.

The request becomes a `Conversation` (dnet/api/chat.py); the answer comes back as
`chat.completion` (or `chat.completion.chunk` events): `message.content`,
`message.reasoning_content` for a thinking model's reasoning (as vLLM and mlx-lm's server
name it) and `message.tool_calls` with `finish_reason: "tool_calls"`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from dnet.api.chat import (
    Conversation,
    FormatKind,
    OutputFormat,
    ReasoningEffort,
    ToolChoice,
    ToolChoiceKind,
    prepare_chat,
)
from dnet.api.errors import ApiError
from dnet.api.generation import (
    Answer,
    Backend,
    Job,
    Step,
    answers,
    check_model,
    choice_steps,
    make_job,
    openai_usage,
)
from dnet.api.logprobs import chat_entries
from dnet.api.output import Channel, Delta, ToolCall
from dnet.api.schema import ChatRequest, Message, NamedToolChoice
from dnet.api.streaming import (
    FAILURES,
    event_stream,
    first_item,
    merge,
    off_the_loop,
    sse,
    stream_error,
    unless_disconnected,
)

log = logging.getLogger(__name__)

IMAGE_PARTS = ("image_url", "input_image", "image")
TEXT_PARTS = ("text", "input_text", "output_text", "reasoning_text")
CONTENT_REQUIRED = ("system", "developer", "user", "tool")


def part_text(part: dict[str, Any], where: str) -> str:
    """The text of a content part; ApiError (400) for images and other kinds."""
    if not isinstance(part, dict):
        raise ApiError(400, f"{where} must be a content part object", param=where)
    kind = part.get("type")
    if kind in TEXT_PARTS and isinstance(part.get("text"), str):
        return part["text"]
    if kind in IMAGE_PARTS:
        raise ApiError(400, f"{where}: images are not supported; this model takes text only",
                       param=where)
    raise ApiError(400, f"{where}: content parts of type {kind!r} are not supported; send "
                        "text parts", param=where)


def _content(message: Message, where: str) -> str:
    if message.content is None:
        if message.role in CONTENT_REQUIRED:
            raise ApiError(400, f"{where}.content is required for a {message.role} message",
                           param=f"{where}.content")
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part_text(part, f"{where}.content[{j}]")
                   for j, part in enumerate(message.content))


def arguments_object(arguments: str | dict, where: str) -> dict:
    """Tool-call arguments as an object, as chat templates expect them."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str):
        raise ApiError(400, f"{where} must be a JSON object or its text", param=where)
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"{where} is not valid JSON: {exc}", param=where) from exc
    if not isinstance(value, dict):
        raise ApiError(400, f"{where} must be a JSON object", param=where)
    return value


def template_message(message: Message, index: int) -> dict[str, Any]:
    """One OpenAI message in the shape Hugging Face chat templates take."""
    where = f"messages[{index}]"
    out: dict[str, Any] = {"role": message.role, "content": _content(message, where)}
    if message.name is not None:
        out["name"] = message.name
    if message.role == "tool":
        if message.tool_call_id is None:
            raise ApiError(400, f"{where}.tool_call_id is required for a tool message",
                           param=f"{where}.tool_call_id")
        out["tool_call_id"] = message.tool_call_id
    if message.role == "assistant":
        if message.tool_calls:
            out["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {
                    "name": call.function.name,
                    "arguments": arguments_object(
                        call.function.arguments,
                        f"{where}.tool_calls[{j}].function.arguments")}}
                for j, call in enumerate(message.tool_calls)]
        if message.reasoning_content is not None:
            out["reasoning_content"] = message.reasoning_content
    return out


def conversation_of(body: ChatRequest) -> Conversation:
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    choice = ToolChoice()
    if isinstance(body.tool_choice, NamedToolChoice):
        choice = ToolChoice(ToolChoiceKind.NAMED, body.tool_choice.function.name)
    elif body.tool_choice is not None:
        choice = ToolChoice(ToolChoiceKind(body.tool_choice))
    fmt = OutputFormat()
    if body.response_format is not None and body.response_format.type == "json_object":
        fmt = OutputFormat(FormatKind.JSON_OBJECT)
    elif body.response_format is not None and body.response_format.type == "json_schema":
        if body.response_format.json_schema is None:
            raise ApiError(400, "response_format json_schema needs a json_schema object",
                           param="response_format.json_schema")
        fmt = OutputFormat(FormatKind.JSON_SCHEMA, body.response_format.json_schema.schema_,
                           param="response_format.json_schema.schema")
    return Conversation(
        messages=[template_message(m, i) for i, m in enumerate(body.messages)],
        tools=tools, tool_choice=choice,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        output_format=fmt, template_kwargs=dict(body.chat_template_kwargs or {}),
        reasoning_effort=ReasoningEffort(body.reasoning_effort) if body.reasoning_effort
        else None)


def chat_jobs(backend: Backend, body: ChatRequest, *, escape: bool) -> list[Job]:
    prepared = prepare_chat(backend.tokenizer, conversation_of(body), escape=escape)
    return [make_job(backend, body.options(), prepared.prompt, output=prepared.output,
                     grammar=prepared.grammar, choice=i) for i in range(body.n)]


def tool_call_json(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": call.id, "type": "function",
                           "function": {"name": call.name, "arguments": call.arguments}}
    if index is not None:
        out["index"] = index
    return out


def _choice(backend: Backend, body: ChatRequest, index: int, result: Answer) -> dict[str, Any]:
    calls = result.tool_calls
    content = result.text(Channel.CONTENT)
    message: dict[str, Any] = {"role": "assistant",
                               "content": None if calls and not content else content}
    reasoning = result.text(Channel.REASONING)
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [tool_call_json(c) for c in calls]
    choice: dict[str, Any] = {
        "index": index, "message": message, "finish_reason": result.finish.value,
        "logprobs": {"content": chat_entries(result.tokens, backend.tokenizer.token_bytes)}
        if body.logprobs else None}
    if body.return_token_ids:
        choice["token_ids"] = [t.id for t in result.tokens]
    return choice


def chat_response(backend: Backend, body: ChatRequest, jobs: list[Job],
                  results: list[Answer]) -> dict[str, Any]:
    completion = sum(r.completion_tokens for r in results)
    return {"id": f"chatcmpl-{jobs[0].id}", "object": "chat.completion",
            "created": jobs[0].created, "model": backend.model_name,
            "choices": [_choice(backend, body, i, r) for i, r in enumerate(results)],
            "usage": openai_usage(len(jobs[0].prompt), completion, results[0].cached_tokens)}


class ChatChunks:
    """`chat.completion.chunk` events for the steps of n choices."""

    def __init__(self, backend: Backend, body: ChatRequest, jobs: list[Job]) -> None:
        self.backend, self.body, self.jobs = backend, body, jobs
        self.base = {"id": f"chatcmpl-{jobs[0].id}", "object": "chat.completion.chunk",
                     "created": jobs[0].created, "model": backend.model_name}
        self.started: set[int] = set()
        self.calls = [0] * len(jobs)
        self.completion_tokens = 0
        self.cached_tokens = 0

    def chunk(self, index: int, step: Step) -> str:
        if index == 0:
            self.cached_tokens = self.cached_tokens or step.cached_tokens
        delta: dict[str, Any] = {}
        if index not in self.started:
            self.started.add(index)
            delta = {"role": "assistant", "content": ""}
        content = "".join(p.text for p in step.parts
                          if isinstance(p, Delta) and p.channel is Channel.CONTENT)
        reasoning = "".join(p.text for p in step.parts
                            if isinstance(p, Delta) and p.channel is Channel.REASONING)
        if content:
            delta["content"] = content
        if reasoning:
            delta["reasoning_content"] = reasoning
        calls = [p for p in step.parts if isinstance(p, ToolCall)]
        if calls:
            delta["tool_calls"] = [tool_call_json(c, self.calls[index] + k)
                                   for k, c in enumerate(calls)]
            self.calls[index] += len(calls)
        self.completion_tokens += len(step.tokens)
        choice: dict[str, Any] = {
            "index": index, "delta": delta,
            "finish_reason": step.finish.value if step.finish else None,
            "logprobs": {"content": chat_entries(step.tokens, self.backend.tokenizer.token_bytes)}
            if self.body.logprobs else None}
        if self.body.return_token_ids:
            choice["token_ids"] = [t.id for t in step.tokens]
        body = {**self.base, "choices": [choice]}
        if self.body.include_usage():
            body["usage"] = None
        return sse(body)

    async def events(self, tagged: AsyncIterator[tuple[int, Step]]) -> AsyncIterator[str]:
        try:
            async for index, step in tagged:
                yield self.chunk(index, step)
        except FAILURES as exc:
            log.warning("request %s failed mid-stream: %s", self.jobs[0].id, exc)
            yield sse(stream_error(exc).body())
        else:
            if self.body.include_usage():
                yield sse({**self.base, "choices": [], "usage": openai_usage(
                    len(self.jobs[0].prompt), self.completion_tokens, self.cached_tokens)})
        yield "data: [DONE]\n\n"


def tagged_steps(backend: Backend, jobs: list[Job]) -> AsyncIterator[tuple[int, Step]]:
    return merge(choice_steps(backend, jobs))


async def serve(request: Request, backend: Backend, body: ChatRequest, *,
                escape: bool) -> Response | dict[str, Any]:
    check_model(backend, body.model)
    jobs = await off_the_loop(chat_jobs, backend, body, escape=escape)
    if body.stream:
        _, source = await first_item(tagged_steps(backend, jobs))
        return event_stream(ChatChunks(backend, body, jobs).events(source))
    results = await unless_disconnected(request, answers(backend, jobs))
    return chat_response(backend, body, jobs, results)
