"""One completion, from validated request to OpenAI-shaped pieces of text.

The HTTP layer turns a request into a Job (prompt tokens + sampling), and `pieces` turns the
ring's tokens into text deltas with log-probabilities, applying stop strings on the way.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlx_lm.tokenizer_utils import _byte_decoder

from dnet.api.schema import ApiError, ChatRequest, CompletionRequest, SamplingFields
from dnet.api.textstream import TextStream
from dnet.proto import dnet_ring_pb2 as pb

DEFAULT_MAX_TOKENS = 512


class Backend(Protocol):
    """What the HTTP layer needs from the node behind it."""

    model_name: str
    tokenizer: Any  # mlx_lm TokenizerWrapper
    max_context: int
    vocab_size: int

    def generate(self, prompt: list[int], sampling: pb.SamplingParams) -> AsyncIterator[pb.Token]:
        ...

    def accepts_model(self, name: str | None) -> bool: ...


@dataclass
class Job:
    prompt: list[int]
    sampling: pb.SamplingParams
    stops: list[str]
    logprobs: bool
    top_logprobs: int
    return_token_ids: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Piece:
    text: str
    token_ids: list[int]
    logprobs: list[dict[str, Any]]
    finish_reason: str | None = None


@dataclass
class Totals:
    prompt_tokens: int
    completion_tokens: int = 0

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def chat_prompt(backend: Backend, body: ChatRequest) -> list[int]:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        ids = backend.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as exc:  # the template is the model's own code; any failure is the input's
        raise ApiError(400, f"the chat template rejected the messages: {exc}",
                       param="messages") from exc
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def text_prompt(backend: Backend, body: CompletionRequest) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        bad = [t for t in prompt if not 0 <= t < backend.vocab_size]
        if bad:
            raise ApiError(400, f"prompt token ids out of range: {bad[:5]}", param="prompt")
        return list(prompt)
    text = prompt[0] if isinstance(prompt, list) else prompt
    ids = list(backend.tokenizer.encode(text))
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    return ids


def make_job(backend: Backend, body: SamplingFields, prompt: list[int], *, logprobs: bool,
             top_logprobs: int, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> Job:
    if not backend.accepts_model(body.model):
        raise ApiError(404, f"the model {body.model!r} does not exist; this node serves "
                            f"{backend.model_name!r}", param="model", code="model_not_found")
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="messages")
    room = backend.max_context - len(prompt)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens but the model's context is "
                            f"{backend.max_context}", param="messages",
                       code="context_length_exceeded")
    requested = body.token_limit() or default_max_tokens  # type: ignore[attr-defined]
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < backend.vocab_size:
            raise ApiError(400, f"logit_bias key {key!r} is not a token id", param="logit_bias")
        bias[int(key)] = value
    sampling = pb.SamplingParams(
        temperature=body.temperature or 0.0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 0.0,
        repetition_context_size=body.repetition_context_size or 20,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=bias,
        max_tokens=min(requested, room),
        max_context=len(prompt) + min(requested, room),
        eos_token_ids=[] if body.ignore_eos else sorted(backend.tokenizer.eos_token_ids),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    if body.seed is not None:
        sampling.seed = body.seed % 2**64
    return Job(prompt=prompt, sampling=sampling, stops=body.stop_sequences(),
               logprobs=logprobs, top_logprobs=top_logprobs,
               return_token_ids=body.return_token_ids)


async def pieces(backend: Backend, job: Job, totals: Totals) -> AsyncIterator[Piece]:
    """Text deltas of the completion; the last one carries the finish reason."""
    text = TextStream(backend.tokenizer.detokenizer, job.stops)
    eos = set(job.sampling.eos_token_ids)
    async for token in backend.generate(job.prompt, job.sampling):
        is_eos = token.finish_reason == "stop" and token.token in eos
        delta, ids, logprobs = "", [], []
        if not is_eos:
            totals.completion_tokens += 1
            delta = text.add(token.token)
            ids = [token.token]
            if job.logprobs:
                logprobs = [_logprob_entry(backend, token.token, token.logprob,
                                           zip(token.top_ids, token.top_logprobs, strict=True))]
        if text.stopped:
            yield Piece(delta, ids, logprobs, "stop")
            return
        if token.finish_reason:
            yield Piece(delta + text.finish(), ids, logprobs,
                        "stop" if text.stopped else token.finish_reason)
            return
        yield Piece(delta, ids, logprobs)


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """A token's own bytes, which may be part of a multi-byte character."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        byte_level = _byte_decoder()
        if all(c in byte_level for c in piece):  # GPT-2 style byte-level BPE
            return bytes(byte_level[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
    return tokenizer.decode([token_id]).encode()


def _logprob_entry(backend: Backend, token: int, logprob: float, top) -> dict[str, Any]:
    def describe(token_id: int, value: float) -> dict[str, Any]:
        raw = token_bytes(backend.tokenizer, token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": value,
                "bytes": list(raw)}

    entry = describe(token, logprob)
    entry["top_logprobs"] = [describe(i, v) for i, v in top]
    return entry
