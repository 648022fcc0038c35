"""The model's output text, split into content, reasoning and tool calls.

mlx-lm's TextStateMachine (handed in by the tokenizer) follows the model's markers: text
between the think markers is reasoning, text between the tool-call markers is a tool call,
which mlx-lm's parser for the model's format turns into a name and arguments. The markers
themselves are never returned.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any

from dnet.api.tokenizer import ChatTokenizer

log = logging.getLogger(__name__)

TOOL_STATE = "tool"


class Channel(Enum):
    CONTENT = "normal"
    REASONING = "reasoning"


@dataclass(frozen=True)
class Delta:
    channel: Channel
    text: str


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text


Part = Delta | ToolCall


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def initial_state(tokenizer: ChatTokenizer, prompt: list[int]) -> str:
    """"reasoning" when the prompt leaves a think block open (a template that starts the
    answer inside one), else "normal"; a tokenizer's response format may fix it."""
    state = "normal"
    think = tokenizer.think
    if think is not None and tokenizer.rfind(prompt, think.start_ids) > tokenizer.rfind(
            prompt, think.end_ids):
        state = "reasoning"
    return tokenizer.initial_state or state


def parse_calls(tokenizer: ChatTokenizer, text: str, tools: list[dict] | None) -> list[ToolCall]:
    """Tool calls in the text between the markers, by mlx-lm's parser for the model's format;
    ValueError when the text is not a well-formed call."""
    assert tokenizer.tools is not None
    try:
        parsed = tokenizer.tools.parse(text, tools)
    except (ValueError, KeyError, TypeError, AttributeError, SyntaxError) as exc:
        raise ValueError(f"unparseable tool call: {exc}") from exc
    calls = []
    for call in parsed if isinstance(parsed, list) else [parsed]:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ValueError(f"a tool call without a name: {call!r}")
        arguments: Any = call.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(ToolCall(call.get("id") or new_call_id(), call["name"], arguments))
    return calls


class OutputParser:
    """Feeds text through the state machine; returns parts in the order they happened."""

    def __init__(self, tokenizer: ChatTokenizer, state: str, tools: list[dict] | None,
                 parse_tools: bool, *, raw: bool = False) -> None:
        self.tokenizer = tokenizer
        self.raw = raw  # no parsing: every character is content
        self.machine = tokenizer.text_state_machine()
        self.state = self.machine.make_state(state)
        self.tools = tools
        self.parse_tools = parse_tools and tokenizer.tools is not None
        self._tool_text = ""
        self._in_tool = False
        # After a marker (`</think>`, `</tool_call>`), newlines that belong to the template's
        # layout (Qwen3 renders "</think>\n\n" + answer) are not text: they are dropped.
        self._channel = Channel.REASONING if state == Channel.REASONING.value else \
            Channel.CONTENT
        self._fresh = False

    @property
    def reasoning(self) -> bool:
        return self.state[0] == Channel.REASONING.value

    def feed(self, text: str) -> list[Part]:
        if not text:
            return []
        if self.raw:
            return [Delta(Channel.CONTENT, text)]
        self.state, segments = self.machine.split(self.state, text)
        return self._collect(segments)

    def finish(self) -> list[Part]:
        """The output ended: flush held-back text and any tool call left open."""
        if self.raw:
            return []
        self.state, rest, current = self.machine.flush(self.state)
        parts = self._collect([(current, rest)])
        if self._in_tool:
            parts += self._close_tool()
        return parts

    def _collect(self, segments: list[tuple[str | None, str]]) -> list[Part]:
        parts: list[Part] = []
        for state, text in segments:
            if state == TOOL_STATE:
                self._in_tool = True
                self._tool_text += text
                continue
            if self._in_tool:
                parts += self._close_tool()
            channel = Channel.REASONING if state == Channel.REASONING.value else Channel.CONTENT
            if channel is not self._channel:
                self._channel, self._fresh = channel, True
            if self._fresh and not self.raw:
                text = text.lstrip("\n")
            if text:
                self._fresh = False
                parts.append(Delta(channel, text))
        return parts

    def _close_tool(self) -> list[Part]:
        text, self._tool_text, self._in_tool = self._tool_text, "", False
        self._fresh = True
        markers = self.tokenizer.tools.markers if self.tokenizer.tools else None
        raw = f"{markers.start}{text}{markers.end}" if markers else text
        if not self.parse_tools:
            return [Delta(Channel.CONTENT, raw)]
        try:
            return list(parse_calls(self.tokenizer, text, self.tools))
        except ValueError as exc:
            # Nothing is lost: the text the model wrote comes back as content.
            log.warning("returning a tool call as text: %s", exc)
            return [Delta(Channel.CONTENT, raw)]
