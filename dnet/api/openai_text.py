"""OpenAI text completions: `POST /v1/completions`.

The returned text is the exact continuation of the prompt (each token's own bytes, the first
token's leading space included). `echo` returns the prompt's text first, and with `logprobs`
the prompt tokens' log-probabilities too (the first token has none), which is what
lm-evaluation-harness asks for to score log-likelihoods; `max_tokens: 0` with `echo` scores
the prompt without generating. Raw prompts keep parsing special-token strings.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from dnet.api.errors import ApiError
from dnet.api.generation import (
    Answer,
    Backend,
    FinishReason,
    Job,
    OutputSpec,
    Step,
    answers,
    check_model,
    choice_steps,
    make_job,
    openai_usage,
)
from dnet.api.logprobs import LegacyLogprobs
from dnet.api.output import Delta
from dnet.api.schema import CompletionRequest
from dnet.api.streaming import (
    FAILURES,
    event_stream,
    first_item,
    merge,
    off_the_loop,
    sse,
    stream_error,
    unless_disconnected,
)
from dnet.api.textstream import TokenText

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextPrompt:
    ids: list[int]
    pieces: list[str]  # the text each prompt token completes (for echo and offsets)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def text_prompt(backend: Backend, body: CompletionRequest) -> TextPrompt:
    tokenizer = backend.tokenizer
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        bad = [t for t in prompt if not 0 <= t < backend.vocab_size]
        if bad:
            raise ApiError(400, f"prompt token ids out of range: {bad[:5]}", param="prompt")
        ids = list(prompt)
    else:
        text = prompt[0] if isinstance(prompt, list) else prompt
        ids = tokenizer.encode(text, add_special_tokens=True)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
    decoder = TokenText(tokenizer.token_bytes)
    pieces = [decoder.add(token) for token in ids]
    pieces[-1] += decoder.finish()
    return TextPrompt(ids, pieces)


def text_jobs(backend: Backend, body: CompletionRequest, prompt: TextPrompt) -> list[Job]:
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(400, "max_tokens must be at least 1 (0 is allowed with echo)",
                       param="max_tokens")
    scored = body.echo and body.logprobs is not None
    return [make_job(backend, body.options(), prompt.ids, param="prompt",
                     output=OutputSpec(raw=True), prompt_logprobs=scored, choice=i)
            for i in range(body.n)]


def needs_ring(body: CompletionRequest) -> bool:
    """Echo of a prompt with nothing generated and nothing scored needs no ring."""
    return not (body.echo and body.max_tokens == 0 and body.logprobs is None)


def _text(result: Answer) -> str:
    return "".join(p.text for p in result.parts if isinstance(p, Delta))


class TextChoice:
    """One choice's text and legacy log-probabilities, the echoed prompt first."""

    def __init__(self, backend: Backend, body: CompletionRequest, prompt: TextPrompt) -> None:
        self.body = body
        self.prompt = prompt
        self.echoed = not body.echo
        self.logprobs = LegacyLogprobs(backend.tokenizer.token_bytes)

    def piece(self, text: str, step: Step) -> tuple[str, dict | None]:
        if not self.echoed:
            self.echoed = True
            text = self.prompt.text + text
            if self.body.logprobs is not None:
                self.logprobs.add_prompt(self.prompt.ids, self.prompt.pieces,
                                         step.prompt_logprobs)
        for token in step.tokens:
            self.logprobs.add_generated(token)
        return text, self.logprobs.take() if self.body.logprobs is not None else None


def text_response(backend: Backend, body: CompletionRequest, prompt: TextPrompt,
                  results: list[Answer], response_id: str, created: int) -> dict[str, Any]:
    choices = []
    for i, result in enumerate(results):
        step = Step(tokens=result.tokens, prompt_logprobs=result.prompt_logprobs)
        text, logprobs = TextChoice(backend, body, prompt).piece(_text(result), step)
        choice: dict[str, Any] = {"index": i, "text": text,
                                  "finish_reason": result.finish.value, "logprobs": logprobs}
        if body.return_token_ids:
            choice["token_ids"] = [t.id for t in result.tokens]
        choices.append(choice)
    completion = sum(r.completion_tokens for r in results)
    return {"id": f"cmpl-{response_id}", "object": "text_completion", "created": created,
            "model": backend.model_name, "choices": choices,
            "usage": openai_usage(len(prompt.ids), completion, results[0].cached_tokens)}


def echo_only(backend: Backend, body: CompletionRequest, prompt: TextPrompt) -> dict[str, Any]:
    """The answer to an echo with nothing to generate or score: no ring needed."""
    results = [Answer(prompt_tokens=len(prompt.ids), finish=FinishReason.LENGTH)
               for _ in range(body.n)]
    return text_response(backend, body, prompt, results, uuid.uuid4().hex, int(time.time()))


class TextChunks:
    """`text_completion` stream events for the steps of n choices."""

    def __init__(self, backend: Backend, body: CompletionRequest, prompt: TextPrompt,
                 jobs: list[Job]) -> None:
        self.body, self.jobs, self.prompt = body, jobs, prompt
        self.choices = [TextChoice(backend, body, prompt) for _ in jobs]
        self.base = {"id": f"cmpl-{jobs[0].id}", "object": "text_completion",
                     "created": jobs[0].created, "model": backend.model_name}
        self.completion_tokens = 0
        self.cached_tokens = 0

    def chunk(self, index: int, step: Step) -> str:
        if index == 0:
            self.cached_tokens = self.cached_tokens or step.cached_tokens
        text = "".join(p.text for p in step.parts if isinstance(p, Delta))
        text, logprobs = self.choices[index].piece(text, step)
        self.completion_tokens += len(step.tokens)
        choice: dict[str, Any] = {"index": index, "text": text, "logprobs": logprobs,
                                  "finish_reason": step.finish.value if step.finish else None}
        if self.body.return_token_ids:
            choice["token_ids"] = [t.id for t in step.tokens]
        body = {**self.base, "choices": [choice]}
        if self.body.include_usage():
            body["usage"] = None
        return sse(body)

    async def events(self, tagged: AsyncIterator[tuple[int, Step]]) -> AsyncIterator[str]:
        try:
            async for index, step in tagged:
                yield self.chunk(index, step)
        except FAILURES as exc:
            log.warning("request %s failed mid-stream: %s", self.jobs[0].id, exc)
            yield sse(stream_error(exc).body())
        else:
            if self.body.include_usage():
                yield sse({**self.base, "choices": [], "usage": openai_usage(
                    len(self.prompt.ids), self.completion_tokens, self.cached_tokens)})
        yield "data: [DONE]\n\n"


async def serve(request: Request, backend: Backend,
                body: CompletionRequest) -> Response | dict[str, Any]:
    check_model(backend, body.model)
    prompt = await off_the_loop(text_prompt, backend, body)
    if not needs_ring(body):
        whole = echo_only(backend, body, prompt)
        if not body.stream:
            return whole
        chunks = [sse({**whole, "choices": [c]}) for c in whole["choices"]]
        return event_stream(_iterate([*chunks, "data: [DONE]\n\n"]))
    jobs = text_jobs(backend, body, prompt)
    if body.stream:
        _, source = await first_item(merge(choice_steps(backend, jobs)))
        return event_stream(TextChunks(backend, body, prompt, jobs).events(source))
    results = await unless_disconnected(request, answers(backend, jobs))
    return text_response(backend, body, prompt, results, jobs[0].id, jobs[0].created)


async def _iterate(items: list[str]) -> AsyncIterator[str]:
    for item in items:
        yield item
