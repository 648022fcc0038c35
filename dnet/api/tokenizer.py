"""What the HTTP layer needs from a model's tokenizer, as a protocol.

The implementation (`dnet/tokenizer.py`) wraps mlx-lm's TokenizerWrapper; it is built outside
`dnet/api/` and handed in, because importing mlx-lm loads MLX and the HTTP layer must not.
Tests hand in fakes or the real thing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Markers:
    """A pair of markers in the model's output, e.g. `<think>` / `</think>`, as text and ids."""

    start: str
    end: str
    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]


@dataclass(frozen=True)
class ToolFormat:
    """How the model writes tool calls: mlx-lm's parser module name (`json_tools`,
    `qwen3_coder`, ...), its markers, and its `parse_tool_call(text, tools)` function, which
    returns a dict (or list of dicts) with `name` and `arguments`."""

    name: str
    markers: Markers
    parse: Callable[[str, list[dict] | None], Any]


class ChatTokenizer(Protocol):
    vocab_size: int
    eos_token_ids: frozenset[int]
    has_chat_template: bool
    template_source: str  # the Jinja template (or a description of a custom renderer)
    added_token_ids: frozenset[int]  # every added token, special or not: they split text
    special_tokens: tuple[str, ...]  # the strings of the tokens marked special
    think: Markers | None  # None when the model does not think
    tools: ToolFormat | None  # None when the tokenizer has no tool-call format
    initial_state: str | None  # a response format's first state ("reasoning"), if it fixes one

    def token_bytes(self, token_id: int) -> bytes:
        """The token's exact bytes (a leading space included; maybe part of a character)."""
        ...

    def encode(self, text: str, *, add_special_tokens: bool = False,
               split_special_tokens: bool = False) -> list[int]: ...

    def token_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` (special-token strings parsed) with each id's character span."""
        ...

    def render_chat(self, messages: list[dict], tools: list[dict] | None,
                    template_kwargs: dict[str, Any]) -> str:
        """The chat template's text for the messages, with the generation prompt; raises
        whatever the template raises."""
        ...

    def text_state_machine(self) -> Any:
        """A fresh mlx-lm TextStateMachine (states "normal", "reasoning", "tool")."""
        ...

    def rfind(self, tokens: list[int], sequence: tuple[int, ...], start: int = 0) -> int: ...
