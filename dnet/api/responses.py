"""OpenAI's Responses API: `POST /v1/responses` (what Codex and `client.responses` speak).

`input` as a string or items (messages, `function_call`, `function_call_output`,
`reasoning`), `instructions`, function `tools` and `tool_choice`, `text.format` (JSON object
or schema), `max_output_tokens`, sampling, `reasoning` items for thinking models, and the
Responses stream events. Nothing is stored: `previous_response_id` gets a 400 (send the
whole conversation as `input`), and `store` changes nothing.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, ClassVar, Literal

from fastapi import Request
from fastapi.responses import Response
from pydantic import Field, field_validator

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
    FinishReason,
    Job,
    Options,
    Step,
    answer,
    check_model,
    make_job,
    steps,
)
from dnet.api.openai_chat import arguments_object, part_text
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




class TextFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None


class TextConfig(Body):
    format: TextFormat | None = None


class ReasoningConfig(Body):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None


class FunctionChoice(Body):
    type: Literal["function"]
    name: str


class ResponsesRequest(Body):
    unsupported: ClassVar[dict[str, str]] = {
        "conversation": "nothing is stored here; send the whole conversation as input",
        "prompt": "stored prompts are not kept here; send the instructions and input",
        "background": "responses run in the foreground only",
        "top_logprobs": "log-probabilities are not reported on this API (use /v1/chat/"
                        "completions)"}

    model: str | None = None
    input: str | Annotated[list[dict[str, Any]], Field(min_length=1)]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    stream: bool = False
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    previous_response_id: str | None = None
    store: bool | None = None  # accepted; nothing is stored either way
    metadata: dict[str, str] | None = None  # echoed back
    include: list[str] | None = None

    @field_validator("include")
    @classmethod
    def _known_includes(cls, value: list[str] | None) -> list[str] | None:
        if value and "message.output_text.logprobs" in value:
            raise ValueError("log-probabilities are not reported on this API (use "
                             "/v1/chat/completions)")
        return value

    def options(self) -> Options:
        return Options(max_tokens=self.max_output_tokens, temperature=self.temperature or 0.0,
                       top_p=self.top_p)


def _item_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of parts", param=where)
    return "".join(part_text(part, f"{where}[{j}]") for j, part in enumerate(content))


def _messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    reasoning: list[str] = []
    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        for name in ("call_id", "name", "role"):
            if name in item and not isinstance(item[name], str):
                raise ApiError(400, f"{where}.{name} must be a string", param=f"{where}.{name}")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise ApiError(400, f"{where}.role must be user, assistant, system or developer",
                               param=f"{where}.role")
            message = {"role": role, "content": _item_text(item.get("content", ""),
                                                           f"{where}.content")}
            if role == "assistant" and reasoning:
                message["reasoning_content"], reasoning = "".join(reasoning), []
            messages.append(message)
        elif kind == "function_call":
            if not item.get("name") or not item.get("call_id"):
                raise ApiError(400, f"{where}: a function_call needs a name and a call_id",
                               param=where)
            call = {"id": item.get("call_id"), "type": "function", "function": {
                "name": item.get("name"), "arguments": arguments_object(
                    item.get("arguments", "{}"), f"{where}.arguments")}}
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant" or "tool_calls" not in last and \
                    last["content"]:
                last = {"role": "assistant", "content": ""}
                if reasoning:
                    last["reasoning_content"], reasoning = "".join(reasoning), []
                messages.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            if not item.get("call_id"):
                raise ApiError(400, f"{where}.call_id is required", param=f"{where}.call_id")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": _item_text(item.get("output", ""), f"{where}.output")})
        elif kind == "reasoning":
            reasoning.append(_item_text(item.get("content") or [], f"{where}.content"))
        else:
            raise ApiError(400, f"{where}: input items of type {kind!r} are not supported",
                           param=where)
    return messages


def _tools(body: ResponsesRequest) -> list[dict[str, Any]] | None:
    if not body.tools:
        return None
    tools = []
    for i, tool in enumerate(body.tools):
        if tool.get("type") != "function" or not tool.get("name"):
            raise ApiError(400, f"tools[{i}]: only function tools (with a name) are supported",
                           param=f"tools[{i}]")
        function = {"name": tool["name"], "description": tool.get("description") or "",
                    "parameters": tool.get("parameters") or {"type": "object"}}
        tools.append({"type": "function", "function": function})
    return tools


def conversation_of(body: ResponsesRequest) -> Conversation:
    if body.previous_response_id is not None:
        raise ApiError(400, "previous_response_id is not supported: responses are not stored "
                            "here; send the whole conversation as input",
                       param="previous_response_id")
    choice = ToolChoice()
    if isinstance(body.tool_choice, FunctionChoice):
        choice = ToolChoice(ToolChoiceKind.NAMED, body.tool_choice.name)
    elif body.tool_choice is not None:
        choice = ToolChoice(ToolChoiceKind(body.tool_choice))
    fmt = OutputFormat()
    requested = body.text.format if body.text else None
    if requested is not None and requested.type == "json_object":
        fmt = OutputFormat(FormatKind.JSON_OBJECT, param="text.format")
    elif requested is not None and requested.type == "json_schema":
        if requested.schema_ is None:
            raise ApiError(400, "text.format json_schema needs a schema",
                           param="text.format.schema")
        fmt = OutputFormat(FormatKind.JSON_SCHEMA, requested.schema_, param="text.format.schema")
    effort = body.reasoning.effort if body.reasoning is not None else None
    return Conversation(messages=_messages(body), tools=_tools(body), tool_choice=choice,
                        parallel_tool_calls=body.parallel_tool_calls is not False,
                        output_format=fmt,
                        reasoning_effort=ReasoningEffort(effort) if effort else None)


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def output_item(part: Delta | ToolCall, item_id: str, done: bool = True) -> dict[str, Any]:
    status = "completed" if done else "in_progress"
    if isinstance(part, ToolCall):
        return {"type": "function_call", "id": item_id, "call_id": part.id, "name": part.name,
                "arguments": part.arguments if done else "", "status": status}
    if part.channel is Channel.REASONING:
        content = [{"type": "reasoning_text", "text": part.text}] if done else []
        return {"type": "reasoning", "id": item_id, "summary": [], "content": content,
                "status": status}
    content = [_output_text(part.text)] if done else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": content}


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_object(model: str, body: ResponsesRequest, job: Job, output: list[dict],
                    result: Answer | None) -> dict[str, Any]:
    """The response; `result` None while it is still being written."""
    status, incomplete = "in_progress", None
    if result is not None:
        status = "incomplete" if result.finish is FinishReason.LENGTH else "completed"
        if status == "incomplete":
            incomplete = {"reason": "max_output_tokens"}
    usage = None
    if result is not None:
        usage = {"input_tokens": result.prompt_tokens,
                 "input_tokens_details": {"cached_tokens": result.cached_tokens,
                                          "cache_write_tokens": 0},
                 "output_tokens": result.completion_tokens,
                 "output_tokens_details": {"reasoning_tokens": result.reasoning_tokens},
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
    fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if (
        body.text and body.text.format) else {"type": "text"}
    choice = body.tool_choice
    return {"id": f"resp_{job.id}", "object": "response", "created_at": job.created,
            "status": status, "error": None, "incomplete_details": incomplete,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "model": model, "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": body.reasoning.model_dump() if body.reasoning else None,
            "store": False, "temperature": body.temperature, "text": {"format": fmt},
            "tool_choice": choice.model_dump() if isinstance(choice, FunctionChoice)
            else choice or "auto",
            "tools": body.tools or [], "top_p": body.top_p, "truncation": "disabled",
            "usage": usage, "metadata": body.metadata or {}}


def full_response(model: str, body: ResponsesRequest, job: Job, result: Answer) -> dict:
    output = [output_item(part, _id("fc" if isinstance(part, ToolCall) else
                                    "rs" if part.channel is Channel.REASONING else "msg"))
              for part in result.parts]
    return response_object(model, body, job, output, result)


class ResponseEvents:
    """The Responses stream events for one answer's steps."""

    def __init__(self, model: str, body: ResponsesRequest, job: Job) -> None:
        self.model, self.body, self.job = model, body, job
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.open: Delta | None = None  # the reasoning or message item being written
        self.open_id = ""
        self.result = Answer(prompt_tokens=len(job.prompt))

    def _event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(data, kind)

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.open_id, "output_index": len(self.output), "content_index": 0}

    def _open(self, part: Delta) -> list[str]:
        self.open, self.open_id = Delta(part.channel, ""), _id(
            "rs" if part.channel is Channel.REASONING else "msg")
        empty = {"type": "reasoning_text", "text": ""} if part.channel is Channel.REASONING \
            else _output_text("")
        return [self._event("response.output_item.added", output_index=len(self.output),
                            item=output_item(self.open, self.open_id, done=False)),
                self._event("response.content_part.added", part=empty, **self._where())]

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        part, self.open = self.open, None
        if part.channel is Channel.REASONING:
            content = {"type": "reasoning_text", "text": part.text}
            events = [self._event("response.reasoning_text.done", text=part.text,
                                  **self._where())]
        else:
            content = _output_text(part.text)
            events = [self._event("response.output_text.done", text=part.text, logprobs=[],
                                  **self._where())]
        item = output_item(part, self.open_id)
        events += [self._event("response.content_part.done", part=content, **self._where()),
                   self._event("response.output_item.done", output_index=len(self.output),
                               item=item)]
        self.output.append(item)
        return events

    def part(self, part: Delta | ToolCall) -> list[str]:
        if isinstance(part, ToolCall):
            events = self._close()
            item_id = _id("fc")
            where = {"item_id": item_id, "output_index": len(self.output)}
            item = output_item(part, item_id)
            events += [self._event("response.output_item.added", output_index=len(self.output),
                                   item=output_item(part, item_id, done=False)),
                       self._event("response.function_call_arguments.delta",
                                   delta=part.arguments, **where),
                       self._event("response.function_call_arguments.done",
                                   arguments=part.arguments, name=part.name, **where),
                       self._event("response.output_item.done", output_index=len(self.output),
                                   item=item)]
            self.output.append(item)
            return events
        events = []
        if self.open is None or self.open.channel is not part.channel:
            events = self._close() + self._open(part)
        self.open = Delta(part.channel, self.open.text + part.text)
        kind = "response.reasoning_text.delta" if part.channel is Channel.REASONING \
            else "response.output_text.delta"
        extra = {} if part.channel is Channel.REASONING else {"logprobs": []}
        return [*events, self._event(kind, delta=part.text, **extra, **self._where())]

    async def events(self, source: AsyncIterator[Step]) -> AsyncIterator[str]:
        start = response_object(self.model, self.body, self.job, [], None)
        yield self._event("response.created", response=start)
        yield self._event("response.in_progress", response=start)
        try:
            async for step in source:
                self.result.add(step)
                for event in [e for part in step.parts for e in self.part(part)]:
                    yield event
        except FAILURES as exc:
            log.warning("response %s failed mid-stream: %s", self.job.id, exc)
            error = stream_error(exc)
            failed = {**response_object(self.model, self.body, self.job, self.output, None),
                      "status": "failed", "error": {"code": "server_error",
                                                    "message": error.message}}
            yield self._event("response.failed", response=failed)
            return
        for event in self._close():
            yield event
        final = response_object(self.model, self.body, self.job, self.output, self.result)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        yield self._event(kind, response=final)


async def serve(request: Request, backend: Backend, body: ResponsesRequest, *,
                escape: bool) -> Response | dict[str, Any]:
    check_model(backend, body.model)
    prepared = await off_the_loop(prepare_chat, backend.tokenizer, conversation_of(body),
                                  escape=escape)
    job = make_job(backend, body.options(), prepared.prompt, output=prepared.output,
                   grammar=prepared.grammar, param="input")
    if body.stream:
        _, source = await first_item(steps(backend, job))
        return event_stream(ResponseEvents(backend.model_name, body, job).events(source))
    result = await unless_disconnected(request, answer(backend, job))
    return full_response(backend.model_name, body, job, result)
