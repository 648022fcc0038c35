"""Prompts: chat messages through the model's template, with user text kept as text.

A message's text is the user's, not the template's: `<|im_end|>` typed by a user (or
returned by a tool) must not end their turn and open a fake system turn, as it does when the
rendered template is tokenized with special tokens parsed (mlx-lm's server, vLLM, llama.cpp).
So every string a request brings is rendered with its special-token strings swapped for
private-use placeholder characters; the rendered text is tokenized as Hugging Face does (split
at added tokens, then each run of text on its own), and a run holding placeholders is put
back and tokenized with special tokens as plain text. For text without special-token strings
nothing changes: the ids equal `apply_chat_template(..., tokenize=True)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from dnet.api.errors import ApiError
from dnet.api.tokenizer import ChatTokenizer

PLACEHOLDER_BASES = range(0x100000, 0x10FFFE - 4096, 4096)  # Supplementary Private Use B


class Escaper:
    """Swaps special-token strings for placeholder characters absent from the request."""

    def __init__(self, specials: tuple[str, ...], used: set[str]) -> None:
        base = next((b for b in PLACEHOLDER_BASES
                     if not any(b <= ord(c) < b + len(specials) for c in used)), None)
        if base is None or len(specials) > 4096:
            raise ApiError(400, "the request uses too many private-use characters")
        self.to_placeholder = {s: chr(base + i) for i, s in enumerate(specials)}
        self.from_placeholder = {v: k for k, v in self.to_placeholder.items()}
        longest_first = sorted(specials, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, longest_first))) if specials else None
        self._back = re.compile("|".join(self.from_placeholder)) if specials else None

    def escape(self, value: Any) -> Any:
        """The same structure with every string's special-token strings swapped."""
        if isinstance(value, str):
            if self._pattern is None:
                return value
            return self._pattern.sub(lambda m: self.to_placeholder[m.group(0)], value)
        if isinstance(value, list):
            return [self.escape(v) for v in value]
        if isinstance(value, dict):
            return {k: self.escape(v) for k, v in value.items()}
        return value

    def has_placeholders(self, text: str) -> bool:
        return self._back is not None and self._back.search(text) is not None

    def unescape(self, text: str) -> str:
        if self._back is None:
            return text
        return self._back.sub(lambda m: self.from_placeholder[m.group(0)], text)


def _strings(value: Any) -> set[str]:
    """Every character of every string in a JSON-like value."""
    if isinstance(value, str):
        return set(value)
    if isinstance(value, list):
        return set().union(*(_strings(v) for v in value)) if value else set()
    if isinstance(value, dict):
        return set().union(*(_strings(v) for v in value.values())) if value else set()
    return set()


def _runs(ids: list[int], added: frozenset[int]) -> list[tuple[int, int]]:
    """[start, end) index ranges of the runs of ids between added tokens."""
    runs, start = [], None
    for i, token in enumerate(ids):
        if token in added:
            if start is not None:
                runs.append((start, i))
                start = None
        elif start is None:
            start = i
    if start is not None:
        runs.append((start, len(ids)))
    return runs


def tokenize_rendered(tokenizer: ChatTokenizer, text: str, escaper: Escaper) -> list[int]:
    """Token ids of a rendered template whose request strings were escaped."""
    if not escaper.has_placeholders(text):
        return tokenizer.encode(text)
    ids, spans = tokenizer.token_spans(text)
    out: list[int] = []
    done = 0
    for start, end in _runs(ids, tokenizer.added_token_ids):
        out += ids[done:start]
        run = text[spans[start][0]:spans[end - 1][1]]
        if escaper.has_placeholders(run):
            out += tokenizer.encode(escaper.unescape(run), split_special_tokens=True)
        else:
            out += ids[start:end]
        done = end
    return out + ids[done:]


def render_chat(tokenizer: ChatTokenizer, messages: list[dict], tools: list[dict] | None,
                template_kwargs: dict[str, Any], *, escape: bool = True) -> list[int]:
    """Prompt ids of a conversation (HF chat-template messages, OpenAI function tools);
    ApiError (400) when the template refuses it."""
    if not tokenizer.has_chat_template:
        raise ApiError(400, "this model has no chat template; use /v1/completions",
                       param="messages")
    messages = with_developer_as_system(messages, tokenizer.template_source)
    specials = tokenizer.special_tokens if escape else ()
    escaper = Escaper(specials, _strings([messages, tools or []]))
    try:
        text = tokenizer.render_chat(escaper.escape(messages),
                                     escaper.escape(tools) if tools else None, template_kwargs)
    except Exception as exc:  # the template is the model's own code: its failure is the input's
        raise ApiError(400, f"the chat template rejected the messages: {exc}",
                       param="messages") from exc
    return tokenize_rendered(tokenizer, text, escaper)


def with_developer_as_system(messages: list[dict], template: str) -> list[dict]:
    """The `developer` role as `system` for templates with no branch of their own for it."""
    if "developer" in template:
        return messages
    return [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]


def encode_text_prompt(tokenizer: ChatTokenizer, text: str,
                       encode: Callable[..., list[int]] | None = None) -> list[int]:
    """A raw completions prompt: special-token strings are parsed, as users of raw prompts
    expect, and the tokenizer adds what it adds (a BOS token)."""
    ids = (encode or tokenizer.encode)(text, add_special_tokens=True)
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    return ids
