"""The shared core of every API surface: a request's tokens in, typed steps out.

A surface (OpenAI chat, OpenAI completions, Anthropic Messages, OpenAI Responses) builds a
`Job` (prompt tokens, sampling, what to parse) and reads `steps`: per ring token, the text it
released split into content, reasoning and tool calls, the token's log-probabilities, and at
the end the finish reason. Stop strings, exact decoding and marker parsing happen once, here.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from dnet.api.errors import ApiError
from dnet.api.harmony import HarmonyParser
from dnet.api.output import Channel, Delta, OutputParser, Part, ToolCall
from dnet.api.textstream import TextStream, TokenText
from dnet.api.tokenizer import ChatTokenizer
from dnet.proto import dnet_ring_pb2 as pb

DEFAULT_MAX_TOKENS = 512


class Backend(Protocol):
    """What the HTTP layer needs from the node behind it."""

    model_name: str
    tokenizer: ChatTokenizer
    max_context: int
    vocab_size: int

    def generate(self, prompt: list[int], sampling: pb.SamplingParams) -> AsyncIterator[pb.Token]:
        ...

    def accepts_model(self, name: str | None) -> bool: ...

    async def ensure_available(self) -> None:
        """Raise ApiError (503, `server_error`, naming why) when no ring can serve now; called
        before any templating, so every endpoint answers alike. May wait a bounded time for a
        ring that is about to serve (a node the coordinator is planning in)."""


class FinishReason(Enum):
    STOP = "stop"  # an end-of-sequence token, a stop string, or a grammar completed
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"


@dataclass(frozen=True)
class Options:
    """Sampling and limits, as every surface expresses them."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    repetition_context_size: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] = field(default_factory=dict)
    seed: int | None = None
    stops: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False


@dataclass(frozen=True)
class OutputSpec:
    """How to read the output: the parser's first state and the request's tools."""

    state: str = "normal"
    raw: bool = False  # text completions: no markers are parsed, the text is all content
    tools: list[dict] | None = None
    parse_tools: bool = False
    parallel_tool_calls: bool = True


@dataclass
class Job:
    prompt: list[int]
    sampling: pb.SamplingParams
    stops: tuple[str, ...] = ()
    output: OutputSpec = field(default_factory=OutputSpec)
    hidden: bool = False  # max_tokens 0 (echo): the one token sampled is not returned
    reasoning_budget: int | None = None  # end the answer after this many reasoning tokens
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(frozen=True)
class TokenInfo:
    """One generated token as the client sees it."""

    id: int
    text: str  # the text this token completed (empty for part of a character)
    raw: bytes
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Step:
    parts: list[Part] = field(default_factory=list)
    tokens: list[TokenInfo] = field(default_factory=list)
    reasoning_tokens: int = 0
    finish: FinishReason | None = None
    stop_sequence: str | None = None  # the stop string that ended the answer
    prompt_logprobs: list[pb.PromptLogprob] = field(default_factory=list)
    cached_tokens: int = 0  # on the first step: prompt tokens the prefix cache supplied


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request with `n` > 1: choice 0 keeps the request's seed
    (so it equals the n = 1 answer); the others take 64 bits of BLAKE2b of "seed:index", so
    they differ from each other and from nearby seeds. None stays None (random per choice)."""
    if seed is None:
        return None
    if index == 0:
        return seed % 2**64
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def make_job(backend: Backend, options: Options, prompt: list[int], *,
             output: OutputSpec | None = None, grammar: str = "", prompt_logprobs: bool = False,
             choice: int = 0, param: str = "messages") -> Job:
    """A ring request for the prompt; ApiError (400) when it cannot fit the context."""
    if not prompt:
        raise ApiError(400, "the prompt is empty", param=param)
    room = backend.max_context - len(prompt)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens but the model's context is "
                            f"{backend.max_context}", param=param,
                       code="context_length_exceeded")
    hidden = options.max_tokens == 0
    requested = 1 if hidden else options.max_tokens or DEFAULT_MAX_TOKENS
    if grammar and options.ignore_eos:
        raise ApiError(400, "ignore_eos cannot be combined with a constrained output "
                            "(tools required or named, or a response format)", param="ignore_eos")
    max_tokens = min(requested, room)
    sampling = pb.SamplingParams(
        temperature=options.temperature,
        top_p=options.top_p if options.top_p is not None else 1.0,
        top_k=options.top_k or 0,
        min_p=options.min_p or 0.0,
        repetition_penalty=options.repetition_penalty or 0.0,
        repetition_context_size=options.repetition_context_size or 20,
        presence_penalty=options.presence_penalty or 0.0,
        frequency_penalty=options.frequency_penalty or 0.0,
        logit_bias=_logit_bias(options.logit_bias, backend.vocab_size),
        max_tokens=max_tokens,
        max_context=len(prompt) + max_tokens,
        eos_token_ids=[] if options.ignore_eos else sorted(backend.tokenizer.eos_token_ids),
        logprobs=options.logprobs,
        top_logprobs=options.top_logprobs,
        grammar=grammar,
        prompt_logprobs=prompt_logprobs,
    )
    seed = choice_seed(options.seed, choice)
    if seed is not None:
        sampling.seed = seed
    return Job(prompt=prompt, sampling=sampling, stops=options.stops,
               output=output or OutputSpec(), hidden=hidden)


def _logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    result: dict[int, float] = {}
    for key, value in bias.items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            raise ApiError(400, f"logit_bias key {key!r} is not a token id", param="logit_bias")
        result[int(key)] = value
    return result


def output_parser(tokenizer: ChatTokenizer, spec: OutputSpec) -> OutputParser | HarmonyParser:
    """The parser of the model's output format: harmony's for gpt-oss, mlx-lm's markers for
    the others; text completions (raw) parse nothing."""
    if tokenizer.harmony is not None and not spec.raw:
        return HarmonyParser(parse_tools=spec.parse_tools)
    return OutputParser(tokenizer, spec.state, spec.tools, spec.parse_tools, raw=spec.raw)


class _Reader:
    """One job's text state: exact decoding, stop strings and output parsing."""

    def __init__(self, tokenizer: ChatTokenizer, job: Job) -> None:
        self.tokenizer = tokenizer
        self.job = job
        self.text = TokenText(tokenizer.token_bytes)
        self.stream = TextStream(list(job.stops))
        self.parser = output_parser(tokenizer, job.output)
        self.eos = set(job.sampling.eos_token_ids)
        self.calls = 0
        self.reasoning_tokens = 0

    def step(self, token: pb.Token) -> Step:
        step = Step(prompt_logprobs=list(token.prompt_logprobs),
                    cached_tokens=token.cached_tokens)
        is_eos = token.finish_reason == "stop" and token.token in self.eos
        visible = ""
        if not is_eos and not self.job.hidden:
            released = self.text.add(token.token)
            step.tokens.append(TokenInfo(
                token.token, released, self.tokenizer.token_bytes(token.token), token.logprob,
                list(zip(token.top_ids, token.top_logprobs, strict=True))))
            visible = self.stream.add(released)
        step.parts = self.parser.feed(visible)
        if self.parser.reasoning:
            step.reasoning_tokens = len(step.tokens)
            self.reasoning_tokens += len(step.tokens)
        budget = self.job.reasoning_budget
        over_budget = budget is not None and self.reasoning_tokens >= budget
        ending = bool(token.finish_reason) or self.stream.stopped or over_budget
        if ending:
            if not self.stream.stopped:
                step.parts += self.parser.feed(self.stream.finish(self.text.finish()))
            step.parts += self.parser.finish()
        self.calls += sum(isinstance(part, ToolCall) for part in step.parts)
        if self.calls and not self.job.output.parallel_tool_calls:
            ending = True  # one call was asked for: end the answer after it
        if ending:
            step.finish = self._finish_reason(token, over_budget)
            step.stop_sequence = self.stream.matched
        return step

    def _finish_reason(self, token: pb.Token, over_budget: bool) -> FinishReason:
        if over_budget or self.job.hidden or (token.finish_reason == "length"
                                              and not self.stream.stopped):
            return FinishReason.LENGTH
        return FinishReason.TOOL_CALLS if self.calls else FinishReason.STOP


async def steps(backend: Backend, job: Job) -> AsyncIterator[Step]:
    """The answer step by step; the last step carries the finish reason. Raises RingError
    (from the backend) when the ring fails the request."""
    reader = _Reader(backend.tokenizer, job)
    tokens = backend.generate(job.prompt, job.sampling)
    try:
        async for token in tokens:
            step = reader.step(token)
            yield step
            if step.finish is not None:
                return
    finally:
        await close(tokens)  # at once: the entry releases the request's KV caches


async def close(source: AsyncIterator) -> None:
    """Close an async generator now rather than whenever it is garbage-collected."""
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()


@dataclass
class Answer:
    """A whole answer: its parts in order (adjacent text of one channel merged)."""

    prompt_tokens: int
    parts: list[Part] = field(default_factory=list)
    tokens: list[TokenInfo] = field(default_factory=list)
    reasoning_tokens: int = 0
    finish: FinishReason = FinishReason.STOP
    stop_sequence: str | None = None
    prompt_logprobs: list[pb.PromptLogprob] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens whose KV state came from the prefix cache

    def add(self, step: Step) -> None:
        for part in step.parts:
            last = self.parts[-1] if self.parts else None
            if isinstance(part, Delta) and isinstance(last, Delta) and \
                    last.channel is part.channel:
                self.parts[-1] = Delta(part.channel, last.text + part.text)
            else:
                self.parts.append(part)
        self.tokens += step.tokens
        self.reasoning_tokens += step.reasoning_tokens
        self.prompt_logprobs += step.prompt_logprobs
        self.cached_tokens = self.cached_tokens or step.cached_tokens
        if step.finish is not None:
            self.finish, self.stop_sequence = step.finish, step.stop_sequence

    def text(self, channel: Channel) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, Delta) and
                       p.channel is channel)

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [p for p in self.parts if isinstance(p, ToolCall)]

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


async def answer(backend: Backend, job: Job) -> Answer:
    """The whole answer at once; raises RingError when the ring fails the request."""
    return await _gather(job, steps(backend, job))


async def _gather(job: Job, source: AsyncIterator[Step]) -> Answer:
    result = Answer(prompt_tokens=len(job.prompt))
    async for step in source:
        result.add(step)
    return result


def choice_steps(backend: Backend, jobs: list[Job]) -> list[AsyncIterator[Step]]:
    """The steps of n choices of one prompt, sharing its prefill through the prefix cache:
    choice 0 runs first, and the others start once its first token is out. By then every
    full chunk of the prompt is a block in every shard's cache, so they prefill only the
    prompt's last partial chunk."""
    sources = [steps(backend, job) for job in jobs]
    if len(sources) < 2:
        return sources
    first_out = asyncio.Event()

    async def leader(source: AsyncIterator[Step]) -> AsyncIterator[Step]:
        try:
            async for step in source:
                first_out.set()
                yield step
        finally:
            first_out.set()  # a failed leader lets the others run (and fail) on their own
            await close(source)

    async def follower(source: AsyncIterator[Step]) -> AsyncIterator[Step]:
        try:
            await first_out.wait()
            async for step in source:
                yield step
        finally:
            await close(source)

    return [leader(sources[0]), *(follower(s) for s in sources[1:])]


async def answers(backend: Backend, jobs: list[Job]) -> list[Answer]:
    """Several answers at once (n choices, see `choice_steps`); the first failure cancels
    the others and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_gather(job, source))
                     for job, source in zip(jobs, choice_steps(backend, jobs), strict=True)]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


def openai_usage(prompt_tokens: int, completion_tokens: int,
                 cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage object (chat and text completions); `cached_tokens` are the prompt
    tokens the prefix cache supplied (the first choice's: n choices count their prompt once)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def check_model(backend: Backend, name: str | None) -> None:
    if not backend.accepts_model(name):
        raise ApiError(404, f"the model {name!r} does not exist; this node serves "
                            f"{backend.model_name!r}", param="model", code="model_not_found")
