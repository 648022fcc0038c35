"""A conversation, whichever API it came from, made ready for the ring.

Each surface (OpenAI chat, Anthropic Messages, OpenAI Responses) translates its request into a
`Conversation`: messages in the shape Hugging Face chat templates take (`role`, `content`,
assistant `tool_calls` with arguments as objects, `tool` messages with `tool_call_id`), tools
as OpenAI function tools, the tool choice and the output format. `prepare_chat` renders the
prompt, decides the grammar and how the output will be parsed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from dnet.api import constraints
from dnet.api.errors import ApiError
from dnet.api.generation import OutputSpec
from dnet.api.output import initial_state
from dnet.api.prompt import render_chat
from dnet.api.tokenizer import ChatTokenizer


class ToolChoiceKind(Enum):
    AUTO = "auto"  # the model decides
    NONE = "none"  # no tools are offered and none is parsed
    REQUIRED = "required"  # the answer is a tool call (constrained)
    NAMED = "named"  # the answer is a call of this tool (constrained)


@dataclass(frozen=True)
class ToolChoice:
    kind: ToolChoiceKind = ToolChoiceKind.AUTO
    name: str | None = None


class FormatKind(Enum):
    TEXT = "text"
    JSON_OBJECT = "json_object"
    JSON_SCHEMA = "json_schema"


@dataclass(frozen=True)
class OutputFormat:
    kind: FormatKind = FormatKind.TEXT
    schema: dict | None = None
    param: str = "response_format"  # where the request said it, for errors


@dataclass
class Conversation:
    messages: list[dict]
    tools: list[dict] | None = None  # [{"type": "function", "function": {...}}]
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True
    output_format: OutputFormat = field(default_factory=OutputFormat)
    template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedChat:
    prompt: list[int]
    grammar: str
    output: OutputSpec


def check_tools(tokenizer: ChatTokenizer, conversation: Conversation) -> None:
    """ApiError (400) for tools the model cannot call, or a tool choice that does not fit."""
    tools, choice = conversation.tools, conversation.tool_choice
    if tools and tokenizer.tools is None:
        raise ApiError(400, "this model's tokenizer has no tool-calling format, so it cannot "
                            "call tools; send the request without tools", param="tools")
    names = [tool["function"]["name"] for tool in tools or []]
    if len(set(names)) != len(names):
        raise ApiError(400, "tool names must be unique", param="tools")
    if choice.kind in (ToolChoiceKind.REQUIRED, ToolChoiceKind.NAMED) and not tools:
        raise ApiError(400, f"tool_choice {choice.kind.value!r} needs tools", param="tool_choice")
    if choice.kind is ToolChoiceKind.NAMED and choice.name not in names:
        raise ApiError(400, f"tool_choice names {choice.name!r}, which is not among the tools",
                       param="tool_choice")
    if choice.kind in (ToolChoiceKind.REQUIRED, ToolChoiceKind.NAMED) and \
            conversation.output_format.kind is not FormatKind.TEXT:
        raise ApiError(400, "a forced tool call cannot also follow a response format",
                       param="tool_choice")


def _grammar(tokenizer: ChatTokenizer, prompt: list[int], state: str,
             conversation: Conversation) -> str:
    choice, fmt = conversation.tool_choice, conversation.output_format
    if choice.kind is ToolChoiceKind.REQUIRED:
        return constraints.tool_call_grammar(tokenizer, prompt, state, conversation.tools or [],
                                             conversation.parallel_tool_calls)
    if choice.kind is ToolChoiceKind.NAMED:
        tool = next(t for t in conversation.tools or [] if t["function"]["name"] == choice.name)
        return constraints.tool_call_grammar(tokenizer, prompt, state, [tool], parallel=False)
    if fmt.kind is FormatKind.JSON_OBJECT:
        return constraints.json_grammar(tokenizer, prompt, state, {"type": "object"}, fmt.param)
    if fmt.kind is FormatKind.JSON_SCHEMA:
        return constraints.json_grammar(tokenizer, prompt, state, fmt.schema or {}, fmt.param)
    return ""


def offered_tools(conversation: Conversation) -> list[dict] | None:
    """The tools the template shows the model: none when tool_choice is "none"."""
    if conversation.tool_choice.kind is ToolChoiceKind.NONE:
        return None
    return conversation.tools or None


def prepare_chat(tokenizer: ChatTokenizer, conversation: Conversation, *,
                 escape: bool = True) -> PreparedChat:
    """Prompt ids, grammar and output parsing for a conversation; ApiError (400) for what
    cannot be served."""
    check_tools(tokenizer, conversation)
    offered = offered_tools(conversation)
    prompt = render_chat(tokenizer, conversation.messages, offered,
                         conversation.template_kwargs, escape=escape)
    state = initial_state(tokenizer, prompt)
    grammar = _grammar(tokenizer, prompt, state, conversation)
    output = OutputSpec(state=state, tools=offered, parse_tools=bool(offered),
                        parallel_tool_calls=conversation.parallel_tool_calls)
    return PreparedChat(prompt, grammar, output)


def count_prompt(tokenizer: ChatTokenizer, conversation: Conversation, *,
                 escape: bool = True) -> int:
    """Tokens the conversation's prompt takes (Anthropic's count_tokens)."""
    check_tools(tokenizer, conversation)
    return len(render_chat(tokenizer, conversation.messages, offered_tools(conversation),
                           conversation.template_kwargs, escape=escape))
