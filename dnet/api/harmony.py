"""OpenAI's harmony format (gpt-oss): its output split into reasoning, content and tool calls.

A gpt-oss answer is a sequence of messages, each `<|start|>{header}<|message|>{body}` ended
by `<|end|>`, `<|call|>` (a tool call: the turn ends) or `<|return|>` (the answer ends). The
chat template opens the first message (`<|start|>assistant`), so the output begins with its
header. The header names the channel (`<|channel|>analysis`, `commentary` or `final`), and
for a tool call its recipient (`to=functions.NAME`, before or after the channel) and content
type (`<|constrain|>json`). Mapped as OpenAI's harmony guide describes the channels:
`analysis` (the chain of thought) is reasoning, `final` and a `commentary` message without a
recipient (a preamble shown to the user) are content, a message to `functions.NAME` is a call
of NAME whose body is its JSON arguments.

Why a parser of our own: mlx-lm 0.32.2 has none (its tool parsers and TextStateMachine match
fixed markers and drop the header, which holds the tool's name), and the `openai-harmony`
package parses token ids of its own o200k encoding, which it downloads at first use
(`o200k_base.tiktoken`): it fails offline and cannot read a model's `tokenizer.json`. The
markers are matched on the decoded text, as mlx-lm matches think and tool markers, so a
tokenizer whose vocabulary has the harmony tokens (`harmony_tokens`) is parsed this way
whatever the model is called.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from dnet.api.output import Channel, Delta, Part, ToolCall, new_call_id
from dnet.api.tokenizer import HarmonyTokens

log = logging.getLogger(__name__)

FUNCTIONS = "functions."  # the namespace of the request's function tools
# A header is a few words ("assistant to=functions.NAME<|channel|>commentary <|constrain|>
# json"); text that runs longer without a `<|message|>` is the model writing plain text.
HEADER_LIMIT = 256


class Marker(Enum):
    START = "<|start|>"
    END = "<|end|>"
    MESSAGE = "<|message|>"
    CHANNEL = "<|channel|>"
    CONSTRAIN = "<|constrain|>"
    CALL = "<|call|>"
    RETURN = "<|return|>"


ENDS = (Marker.END, Marker.CALL, Marker.RETURN)
_MARKER_OF = {m.value: m for m in Marker}
_MARKER_RE = re.compile("|".join(re.escape(m.value) for m in Marker))


class HarmonyChannel(Enum):
    ANALYSIS = "analysis"  # reasoning
    COMMENTARY = "commentary"  # tool calls, and preambles to the user
    FINAL = "final"  # the answer


def harmony_tokens(vocab: Mapping[str, int], added: frozenset[int]) -> HarmonyTokens | None:
    """The harmony markers' ids when every one is an added token of the vocabulary, else None."""
    ids: dict[Marker, int] = {}
    for marker in Marker:
        token = vocab.get(marker.value)
        if token is None or token not in added:
            return None
        ids[marker] = token
    return HarmonyTokens(start=ids[Marker.START], end=ids[Marker.END],
                         message=ids[Marker.MESSAGE], channel=ids[Marker.CHANNEL],
                         constrain=ids[Marker.CONSTRAIN], call=ids[Marker.CALL],
                         return_=ids[Marker.RETURN])


@dataclass(frozen=True)
class Header:
    """A message's header, as read from its text."""

    channel: HarmonyChannel | None
    recipient: str | None  # "functions.get_weather"; None for a message to the user

    @property
    def function(self) -> str | None:
        """The function tool this message calls, if any."""
        if self.recipient is not None and self.recipient.startswith(FUNCTIONS):
            return self.recipient[len(FUNCTIONS):] or None
        return None

    @property
    def output(self) -> Channel:
        return Channel.REASONING if self.channel is HarmonyChannel.ANALYSIS else Channel.CONTENT


def parse_header(text: str) -> Header:
    """The channel and recipient of a header such as `assistant to=functions.f<|channel|>
    commentary json` or `<|channel|>commentary to=functions.f <|constrain|>json`."""
    text = text.replace(Marker.CONSTRAIN.value, " ")
    recipient = re.search(r"\bto=([^\s<]+)", text)
    channel = None
    if Marker.CHANNEL.value in text:
        words = text.split(Marker.CHANNEL.value, 1)[1].split()
        name = words[0] if words else ""
        channel = next((c for c in HarmonyChannel if c.value == name), None)
    return Header(channel, recipient.group(1) if recipient else None)


def _plain(header: str) -> bool:
    """Whether text read as a header is the model's plain text: it has no markers and is more
    than a role and a recipient (`assistant to=functions.f`, cut short by the end)."""
    return not _MARKER_RE.search(header) and not re.fullmatch(
        r"\s*(assistant)?\s*(to=\S*)?\s*", header)


def _held(text: str) -> int:
    """How many characters at the end of `text` may be the start of a marker."""
    start = text.rfind("<|", max(0, len(text) - max(len(m.value) for m in Marker)))
    if start >= 0 and any(m.value.startswith(text[start:]) for m in Marker):
        return len(text) - start
    return 1 if text.endswith("<") else 0


class HarmonyParser:
    """Feeds an answer's text through the harmony markers; returns parts in order.

    Header text is held until its `<|message|>`; a body is released as it comes, except a
    tool call's, which is one `ToolCall` when it ends (by `<|call|>`, or by the output
    ending: `<|call|>` is an end-of-sequence token and never reaches the text). A call whose
    arguments are not JSON, a call to a recipient other than `functions.*` (gpt-oss's
    built-in browser and python tools, which are not offered here), or any call when tools
    were not offered comes back as text, markers and all: nothing the model wrote is lost.
    """

    def __init__(self, parse_tools: bool) -> None:
        self.parse_tools = parse_tools
        self._pending = ""  # text that may be the start of a marker
        self._header: str | None = ""  # the header being read; None inside a body
        self._message: Header | None = None  # the message whose body is being read
        self._raw_header = ""  # its header's text, to return a call that fails as text
        self._body = ""  # a tool call's body so far

    @property
    def reasoning(self) -> bool:
        header = self._message if self._header is None else parse_header(self._header)
        return header is not None and header.channel is HarmonyChannel.ANALYSIS

    def feed(self, text: str) -> list[Part]:
        if not text:
            return []
        text, self._pending = self._pending + text, ""
        parts: list[Part] = []
        done = 0
        for match in _MARKER_RE.finditer(text):
            parts += self._text(text[done:match.start()])
            parts += self._marker(_MARKER_OF[match.group(0)])
            done = match.end()
        rest = text[done:]
        held = _held(rest)
        parts += self._text(rest[:len(rest) - held])
        self._pending = rest[len(rest) - held:]
        return parts

    def finish(self) -> list[Part]:
        """The output ended (an end-of-sequence token, a stop string or the length limit)."""
        parts = self._text(self._pending)
        self._pending = ""
        if self._header is None:
            return parts + self._close()
        return parts + self._drop_header()

    def _drop_header(self) -> list[Part]:
        """A header that ended without its `<|message|>`: markup is dropped, plain text kept."""
        header, self._header = self._header or "", ""
        return [Delta(Channel.CONTENT, header)] if _plain(header) else []

    def _text(self, text: str) -> list[Part]:
        if not text:
            return []
        if self._header is not None:
            self._header += text
            if len(self._header) > HEADER_LIMIT and _plain(self._header):
                plain, self._header = self._header, None  # the model is not speaking harmony
                self._message = Header(None, None)
                return [Delta(Channel.CONTENT, plain)]
            return []
        assert self._message is not None
        if self._message.recipient is not None:
            self._body += text  # a call: one part when it ends
            return []
        return [Delta(self._message.output, text)]

    def _marker(self, marker: Marker) -> list[Part]:
        if self._header is not None:
            if marker is Marker.MESSAGE:
                self._message, self._raw_header = parse_header(self._header), self._header
                self._header, self._body = None, ""
            elif marker in (Marker.CHANNEL, Marker.CONSTRAIN):
                self._header += marker.value
            else:
                return self._drop_header()  # a new message, or an end without a body
            return []
        if marker in ENDS or marker is Marker.START:
            parts = self._close()
            self._header = ""
            return parts
        return self._text(marker.value)  # a marker that has no place in a body is text

    def _close(self) -> list[Part]:
        message, body = self._message, self._body
        self._message, self._body = None, ""
        if message is None or message.recipient is None:
            return []
        raw: list[Part] = [Delta(Channel.CONTENT,
                                 f"{self._raw_header}{Marker.MESSAGE.value}{body}")]
        if message.function is None or not self.parse_tools:
            return raw  # a tool not offered (or none was): nothing is parsed, nothing is lost
        arguments = body.strip()
        try:
            json.loads(arguments)
        except json.JSONDecodeError as exc:
            log.warning("returning a tool call as text: its arguments are not JSON: %s", exc)
            return raw
        return [ToolCall(new_call_id(), message.function, arguments)]


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as gpt-oss's chat template reads them: one tool call per assistant message,
    each followed by its own result (the template renders only the first call of a message
    and names a tool result after the last call before it), and a call message's content
    joined to its reasoning (the template refuses a call message with both, and renders the
    one it gets as the analysis before the call). The reasoning itself (`reasoning_content`)
    reaches the template's `thinking` by transformers' own aliasing."""
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(messages):
        message = messages[i]
        i += 1
        if message.get("role") != "assistant":
            out.append(message)
            continue
        message = _one_analysis(message)
        calls = message.get("tool_calls") or []
        if len(calls) < 2:
            out.append(message)
            continue
        results = []
        while i < len(messages) and messages[i].get("role") == "tool":
            results.append(messages[i])
            i += 1
        ids = [call.get("id") for call in calls]
        for k, call in enumerate(calls):
            out.append({**message, "tool_calls": [call]} if k == 0 else
                       {"role": "assistant", "content": "", "tool_calls": [call]})
            out += [r for r in results if r.get("tool_call_id") == call.get("id")]
        out += [r for r in results if r.get("tool_call_id") not in ids]
    return out


def _one_analysis(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = message.get("reasoning_content")
    if not (message.get("tool_calls") and message.get("content") and reasoning):
        return message
    return {**message, "reasoning_content": f"{reasoning}\n\n{message['content']}",
            "content": ""}
