"""Tokens to text for the client, with stop strings that really stop.

A stop string may span several tokens, so text that could be the start of one is held back
until the next token settles it. The stop string itself is never returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TextStream:
    detokenizer: object  # an mlx-lm StreamingDetokenizer, one per request
    stops: list[str]
    stopped: bool = False
    _held: str = ""
    token_ids: list[int] = field(default_factory=list)

    def add(self, token: int) -> str:
        """Feed one token; returns the text that is now safe to send."""
        if self.stopped:
            return ""
        self.token_ids.append(token)
        self.detokenizer.add_token(token)
        return self._release(self.detokenizer.last_segment)

    def finish(self) -> str:
        """The request ended without a stop string: flush everything held back."""
        if self.stopped:
            return ""
        self.detokenizer.finalize()
        text = self._held + self.detokenizer.last_segment
        self._held = ""
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return text[:cut]
        return text

    def _release(self, segment: str) -> str:
        text = self._held + segment
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = self._partial_stop_suffix(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        return min(found) if found else None

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that some stop string starts with."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-size:]):
                    longest = size
                    break
        return longest
