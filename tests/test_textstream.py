"""TextStream and TokenText: tokens to client text, exact bytes, and stop strings that really
stop (no model, no ring)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dnet.api.textstream import TextStream, TokenText


class FakeDetokenizer:
    """The part of mlx-lm's StreamingDetokenizer that TextStream uses.

    Each token id stands for one piece of text. With `hold_last`, the text of the latest
    token is only handed out when the next token comes or on `finalize` (as mlx-lm does with
    an incomplete UTF-8 character or a lone space).
    """

    def __init__(self, pieces: dict[int, str], *, hold_last: bool = False) -> None:
        self.pieces = pieces
        self.hold_last = hold_last
        self.text = ""
        self._pending = ""
        self._offset = 0

    def add_token(self, token: int) -> None:
        if self.hold_last:
            self.text += self._pending
            self._pending = self.pieces[token]
        else:
            self.text += self.pieces[token]

    def finalize(self) -> None:
        self.text += self._pending
        self._pending = ""

    @property
    def last_segment(self) -> str:
        segment = self.text[self._offset:]
        self._offset = len(self.text)
        return segment


class Fed:
    """A TextStream fed token by token from a source of text segments, as the API feeds it."""

    def __init__(self, detokenizer: FakeDetokenizer, stops: list[str]) -> None:
        self.detokenizer = detokenizer
        self.stream = TextStream(stops)

    def add(self, token: int) -> str:
        self.detokenizer.add_token(token)
        return self.stream.add(self.detokenizer.last_segment)

    def finish(self) -> str:
        self.detokenizer.finalize()
        return self.stream.finish(self.detokenizer.last_segment)

    @property
    def stopped(self) -> bool:
        return self.stream.stopped


def stream_of(texts: list[str], stops: list[str], *, hold_last: bool = False) -> Fed:
    return Fed(FakeDetokenizer(dict(enumerate(texts)), hold_last=hold_last), stops)


def run(texts: list[str], stops: list[str], *, hold_last: bool = False) -> tuple[list[str], str,
                                                                                   bool]:
    """Feed every token (as the API does, up to a stop); returns (deltas, flushed, stopped)."""
    stream = stream_of(texts, stops, hold_last=hold_last)
    deltas = []
    for token in range(len(texts)):
        deltas.append(stream.add(token))
        if stream.stopped:
            return deltas, "", True
    flushed = stream.finish()
    return deltas, flushed, stream.stopped


def test_text_without_stop_strings_passes_through_unchanged() -> None:
    deltas, flushed, stopped = run(["Hel", "lo", ", wor", "ld!"], [])
    assert deltas == ["Hel", "lo", ", wor", "ld!"]
    assert flushed == ""
    assert not stopped


def test_stop_string_inside_one_token_returns_exactly_the_text_before_it() -> None:
    deltas, _, stopped = run(["abc", "deSTOPfg", "never"], ["STOP"])
    assert stopped
    assert "".join(deltas) == "abcde"


def test_stop_string_split_across_tokens() -> None:
    deltas, _, stopped = run(["Hello ST", "O", "P and more"], ["STOP"])
    assert stopped
    assert "".join(deltas) == "Hello "
    # Nothing of the stop string was ever sent, not even its first letters.
    assert all("S" not in d for d in deltas)


def test_stop_string_at_the_very_start_returns_no_text() -> None:
    deltas, _, stopped = run(["ST", "OP", "tail"], ["STOP"])
    assert stopped
    assert "".join(deltas) == ""


def test_partial_prefix_is_held_back_then_released_when_it_is_not_a_stop() -> None:
    stream = stream_of(["abc S", "ay hi"], ["STOP"])
    assert stream.add(0) == "abc "  # "S" could start "STOP": held back
    assert stream.add(1) == "Say hi"  # it did not: released with the next text
    assert not stream.stopped
    assert stream.finish() == ""


def test_longer_partial_prefix_is_released_when_it_diverges() -> None:
    deltas, flushed, stopped = run(["x", "ST", "O", "RY"], ["STOP"])
    assert not stopped
    assert "".join(deltas) + flushed == "xSTORY"


def test_overlapping_partial_matches() -> None:
    # "aab" first occurs at index 1 of "aaab": one "a" must come out, the rest must not.
    deltas, _, stopped = run(["a", "a", "a", "b", "c"], ["aab"])
    assert stopped
    assert "".join(deltas) == "a"


def test_two_stop_strings_the_earliest_in_the_text_wins() -> None:
    # The second listed stop string occurs first in the text.
    deltas, _, stopped = run(["one two three"], ["three", "two"])
    assert stopped
    assert "".join(deltas) == "one "


def test_two_stop_strings_completed_by_one_token_cut_at_the_earliest() -> None:
    deltas, _, stopped = run(["xx a", "bcd yy"], ["bcd", "abc"])
    assert stopped
    assert "".join(deltas) == "xx "


def test_shorter_stop_completing_first_stops_before_a_longer_one_could() -> None:
    # "bc" completes while "abcX" is still only a possibility: generation stops at "bc".
    deltas, _, stopped = run(["ab", "c", "X"], ["abcX", "bc"])
    assert stopped
    assert "".join(deltas) == "a"


def test_finish_flushes_held_back_text() -> None:
    stream = stream_of(["The end ST"], ["STOP"])
    assert stream.add(0) == "The end "
    assert stream.finish() == "ST"
    assert not stream.stopped


def test_finish_flushes_text_the_detokenizer_still_held() -> None:
    deltas, flushed, stopped = run(["Hello", " world"], ["zzz"], hold_last=True)
    assert not stopped
    assert "".join(deltas) + flushed == "Hello world"
    assert flushed == " world"


def test_stop_string_completed_by_the_final_flush_is_not_returned() -> None:
    deltas, flushed, stopped = run(["abc ST", "OP"], ["STOP"], hold_last=True)
    assert stopped
    assert "".join(deltas) + flushed == "abc "


def test_nothing_comes_out_after_a_stop() -> None:
    stream = stream_of(["a STOP b", "more", "text"], ["STOP"])
    assert stream.add(0) == "a "
    assert stream.stopped
    assert stream.add(1) == ""
    assert stream.add(2) == ""
    assert stream.finish() == ""


def expected_text(texts: list[str], stops: list[str], hold_last: bool) -> str:
    """The text a client must see: everything up to the first stop string that appears,
    checked each time new text arrives (generation stops as soon as one appears)."""
    detokenizer = FakeDetokenizer(dict(enumerate(texts)), hold_last=hold_last)
    seen = ""
    segments = []
    for token in range(len(texts)):
        detokenizer.add_token(token)
        segments.append(detokenizer.last_segment)
    detokenizer.finalize()
    segments.append(detokenizer.last_segment)
    for segment in segments:
        seen += segment
        found = [i for i in (seen.find(s) for s in stops) if i >= 0]
        if found:
            return seen[:min(found)]
    return seen


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(st.text(alphabet="abc", max_size=4), min_size=1, max_size=10),
       stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3),
       hold_last=st.booleans())
def test_streamed_text_is_the_text_before_the_first_stop(texts: list[str], stops: list[str],
                                                         hold_last: bool) -> None:
    deltas, flushed, _ = run(texts, stops, hold_last=hold_last)
    assert "".join(deltas) + flushed == expected_text(texts, stops, hold_last)


def test_the_stop_string_that_matched_is_reported() -> None:
    stream = stream_of(["one two three"], ["three", "two"])
    stream.add(0)
    assert stream.stream.matched == "two"


# ----- TokenText: each token's own bytes, decoded incrementally ----------------------------

def test_token_text_keeps_the_first_tokens_leading_space() -> None:
    pieces = {0: b" Hello", 1: b" world"}
    text = TokenText(pieces.__getitem__)
    assert text.add(0) + text.add(1) + text.finish() == " Hello world"


def test_a_character_split_across_tokens_comes_with_the_token_that_completes_it() -> None:
    raw = "é中".encode()  # 2 + 3 bytes, split 1 | 2 | 2
    pieces = {0: raw[:1], 1: raw[1:3], 2: raw[3:]}
    text = TokenText(pieces.__getitem__)
    assert [text.add(0), text.add(1), text.add(2)] == ["", "é", "中"]
    assert text.finish() == ""


def test_a_partial_character_left_at_the_end_becomes_a_replacement_character() -> None:
    text = TokenText({0: "中".encode()[:2]}.__getitem__)
    assert text.add(0) == ""
    assert text.finish() == "\ufffd"


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=20), cuts=st.lists(st.integers(0, 80), max_size=8))
def test_token_text_is_exactly_the_decoded_bytes(text: str, cuts: list[int]) -> None:
    raw = text.encode()
    bounds = sorted({0, len(raw), *(c % (len(raw) + 1) for c in cuts)})
    pieces = dict(enumerate(raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False)))
    decoder = TokenText(pieces.__getitem__)
    assert "".join(decoder.add(i) for i in pieces) + decoder.finish() == text
