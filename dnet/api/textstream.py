"""Tokens to text for the client: exact bytes, and stop strings that really stop.

`TokenText` decodes each token's own bytes incrementally, so the returned text is exactly
the decoded tokens (a completion's first leading space included: the prompt's text plus the
answer's equals the decoded prompt plus answer tokens). A character split across tokens comes
out with the token that completes it.

A stop string may span several tokens, so `TextStream` holds back text that could be the
start of one until the next token settles it. The stop string itself is never returned.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass


class TokenText:
    """Incremental UTF-8 decoding of token bytes; invalid bytes become U+FFFD."""

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        """The text this token completes (empty while a character is still partial)."""
        return self._decoder.decode(self._token_bytes(token))

    def finish(self) -> str:
        """What is left of a partial character at the end, as U+FFFD."""
        return self._decoder.decode(b"", final=True)


@dataclass
class TextStream:
    stops: list[str]
    stopped: bool = False
    matched: str | None = None  # the stop string that ended the text
    _held: str = ""

    def add(self, segment: str) -> str:
        """Feed more text; returns the text that is now safe to send."""
        if self.stopped:
            return ""
        text = self._held + segment
        cut = self._first_stop(text)
        if cut is not None:
            self._held = ""
            return text[:cut]
        keep = self._partial_stop_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def finish(self, segment: str = "") -> str:
        """The text ended without a stop string so far: flush what is held back."""
        if self.stopped:
            return ""
        text = self._held + segment
        self._held = ""
        cut = self._first_stop(text)
        return text if cut is None else text[:cut]

    def _first_stop(self, text: str) -> int | None:
        found = [(i, stop) for stop in self.stops if (i := text.find(stop)) >= 0]
        if not found:
            return None
        index, stop = min(found, key=lambda item: item[0])
        self.stopped, self.matched = True, stop
        return index

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that some stop string starts with."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-size:]):
                    longest = size
                    break
        return longest
