"""A model's tokenizer for the HTTP layer and the tail, built on mlx-lm's TokenizerWrapper.

The HTTP layer (`dnet/api/`) must not import MLX, and importing anything from mlx-lm loads it,
so the wrapper is built here and handed to the HTTP layer behind the `ChatTokenizer` protocol
(`dnet/api/tokenizer.py`). Everything model-specific comes from mlx-lm: the chat template
(including its custom renderers), the think markers, the tool-call markers and parsers, the
end-of-sequence ids. What is added here: the exact bytes of each token (so a completion is the
exact continuation of its prompt) and the classification of added tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

from mlx_lm.generate import make_text_state_machine
from mlx_lm.utils import load_config, load_tokenizer

from dnet.api.tokenizer import Markers, ToolFormat


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (openai/gpt-2 encoder.py,
    `bytes_to_unicode`): byte-level BPE vocabularies spell every byte with one of these."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _decoder_kind(hf_tokenizer: Any) -> str:
    """'byte_level', 'sentencepiece' or 'other', read from the tokenizer's decoder as mlx-lm's
    `tokenizer_utils.load` reads it to pick a streaming detokenizer."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "other"
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if isinstance(decoder, dict) else []
    types = {part.get("type") for part in parts if isinstance(part, dict)}
    if "ByteLevel" in types:
        return "byte_level"
    if "ByteFallback" in types and "Replace" in types:
        return "sentencepiece"
    return "other"


class MlxChatTokenizer:
    """mlx-lm's TokenizerWrapper behind the HTTP layer's `ChatTokenizer` protocol."""

    def __init__(self, wrapper: Any) -> None:
        self._wrapper = wrapper
        self.eos_token_ids = frozenset(wrapper.eos_token_ids)
        self.vocab_size = len(wrapper)
        self.has_chat_template = bool(wrapper.has_chat_template)
        template = wrapper.chat_template
        self.template_source = template if isinstance(template, str) else json.dumps(template)
        decoder = wrapper.added_tokens_decoder
        self.added_token_ids = frozenset(decoder)
        self.special_tokens = tuple(sorted({t.content for t in decoder.values() if t.special}
                                           | set(wrapper.all_special_tokens)))
        self.think = (Markers(wrapper.think_start, wrapper.think_end,
                              tuple(wrapper.think_start_tokens), tuple(wrapper.think_end_tokens))
                      if wrapper.has_thinking else None)
        self.tools = (ToolFormat(
            name=wrapper.init_kwargs.get("tool_parser_type", ""),
            markers=Markers(wrapper.tool_call_start, wrapper.tool_call_end or "",
                            tuple(wrapper.tool_call_start_tokens),
                            tuple(wrapper.tool_call_end_tokens or ())),
            parse=wrapper.tool_parser) if wrapper.has_tool_calling else None)
        self.initial_state = wrapper.response_initial_state

    @cached_property
    def _token_bytes(self) -> list[bytes]:
        kind = _decoder_kind(self._wrapper)
        pieces = self._wrapper.convert_ids_to_tokens(list(range(self.vocab_size)))
        if kind == "byte_level":
            table = _gpt2_byte_decoder()
            # As mlx-lm's BPEStreamingDetokenizer: a character outside the byte alphabet (in an
            # added token) stands for its own UTF-8 bytes.
            return [b"".join(bytes([table[c]]) if c in table else c.encode() for c in piece)
                    for piece in pieces]
        if kind == "sentencepiece":
            return [bytes([int(p[3:5], 16)]) if p.startswith("<0x") and len(p) == 6
                    else p.replace("\u2581", " ").encode() for p in pieces]
        return [self._wrapper.decode([i]).encode() for i in range(self.vocab_size)]

    def token_bytes(self, token_id: int) -> bytes:
        table = self._token_bytes
        return table[token_id] if 0 <= token_id < len(table) else b""

    def encode(self, text: str, *, add_special_tokens: bool = False,
               split_special_tokens: bool = False) -> list[int]:
        return list(self._wrapper.encode(text, add_special_tokens=add_special_tokens,
                                         split_special_tokens=split_special_tokens))

    def token_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self._backend().encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(span) for span in encoding.offsets]

    def render_chat(self, messages: list[dict], tools: list[dict] | None,
                    template_kwargs: dict[str, Any]) -> str:
        return self._wrapper.apply_chat_template(messages, tools=tools, tokenize=False,
                                                 add_generation_prompt=True, **template_kwargs)

    def _backend(self) -> Any:
        backend = getattr(self._wrapper, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("this needs a Hugging Face `tokenizers` (fast) tokenizer")
        return backend

    def backend_json(self) -> str:
        """The `tokenizers` definition (for llguidance); ValueError for other tokenizers."""
        return self._backend().to_str()

    def text_state_machine(self) -> Any:
        """mlx-lm's TextStateMachine for this tokenizer's reasoning and tool-call markers."""
        return make_text_state_machine(self._wrapper)

    def rfind(self, tokens: list[int], sequence: tuple[int, ...], start: int = 0) -> int:
        """Index of the last occurrence of `sequence` in tokens[start:], or -1."""
        size = len(sequence)
        for i in range(len(tokens) - size, max(start, 0) - 1, -1):
            if tuple(tokens[i:i + size]) == sequence:
                return i
        return -1


def load_chat_tokenizer(model_dir: Path) -> MlxChatTokenizer:
    """The tokenizer of a local model directory, with every end-of-sequence id the model
    declares, gathered as `mlx_lm.load` gathers them: `config.json`'s `eos_token_id` (or
    `generation_config.json`'s, through `mlx_lm.utils.load_config`) plus the tokenizer's."""
    config = load_config(model_dir)
    wrapper = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
    return MlxChatTokenizer(wrapper)


TokenizerLoader = Callable[[Path], MlxChatTokenizer]
