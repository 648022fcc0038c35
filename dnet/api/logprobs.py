"""Log-probabilities in OpenAI's two shapes: chat's per-token objects and the legacy lists.

Token names: a token whose bytes are valid UTF-8 is named by its text; a piece of a character
is named as OpenAI names it, `bytes:\\xNN...`, so two fragments never share a key. In chat,
`token` is the text the token completed (empty for a fragment, the whole character for the
token that completes it), so the tokens concatenate to the text; `bytes` are the token's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dnet.api.generation import TokenInfo
from dnet.proto import dnet_ring_pb2 as pb


def token_name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _alternative(token_bytes: Callable[[int], bytes], token: int,
                 value: float) -> dict[str, Any]:
    raw = token_bytes(token)
    return {"token": token_name(raw), "logprob": value, "bytes": list(raw)}


def chat_entries(tokens: Sequence[TokenInfo],
                 token_bytes: Callable[[int], bytes]) -> list[dict[str, Any]]:
    """OpenAI chat's `logprobs.content` entries."""
    return [{"token": t.text, "logprob": t.logprob, "bytes": list(t.raw),
             "top_logprobs": [_alternative(token_bytes, i, v) for i, v in t.top]}
            for t in tokens]


class LegacyLogprobs:
    """The legacy completions shape, built token by token; `text_offset` indexes the text
    returned (the prompt's text first, with echo)."""

    def __init__(self, token_bytes: Callable[[int], bytes], offset: int = 0) -> None:
        self.token_bytes = token_bytes
        self.offset = offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, raw: bytes, text: str, logprob: float | None,
            top: Sequence[tuple[int, float]] | None) -> None:
        self.tokens.append(token_name(raw))
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(None if top is None else {
            token_name(self.token_bytes(i)): v for i, v in top})
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def add_generated(self, token: TokenInfo) -> None:
        self.add(token.raw, token.text, token.logprob, token.top)

    def add_prompt(self, prompt: list[int], texts: list[str],
                   scores: Sequence[pb.PromptLogprob]) -> None:
        """The echoed prompt: its first token has no log-probability (no context)."""
        for k, (token, text) in enumerate(zip(prompt, texts, strict=True)):
            if k == 0:
                self.add(self.token_bytes(token), text, None, None)
                continue
            score = scores[k - 1]
            self.add(self.token_bytes(token), text, score.logprob,
                     list(zip(score.top_ids, score.top_logprobs, strict=True)))

    def take(self) -> dict[str, Any]:
        """What was added since the last take, as OpenAI's `logprobs` object."""
        body = {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return body
