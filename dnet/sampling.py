"""Sampling at the tail, step for step what mlx-lm's generate_step does.

mlx-lm samples from the process-wide random state; a ring serves many requests at once, so
each request carries its own key. Splitting that key once per token reproduces the stream
`mx.random.seed(seed)` gives mlx-lm, so a seeded request samples the same tokens either way.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from dnet.proto import dnet_ring_pb2 as pb

MAX_TOP_LOGPROBS = 20


@dataclass
class Sample:
    token: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class TokenSampler:
    """One request's sampler, logits processors and token history."""

    def __init__(self, params: pb.SamplingParams, vocab_size: int) -> None:
        self.params = params
        self.temperature = float(params.temperature)
        self.processors = make_logits_processors(
            logit_bias=dict(params.logit_bias) or None,
            repetition_penalty=params.repetition_penalty or None,
            repetition_context_size=params.repetition_context_size or 20,
            presence_penalty=params.presence_penalty or None,
            frequency_penalty=params.frequency_penalty or None,
        )
        # The same filters in the same order as mlx_lm.sample_utils.make_sampler.
        self.filters = []
        if 0 < params.top_p < 1.0:
            self.filters.append(partial(apply_top_p, top_p=params.top_p))
        if params.min_p != 0.0:
            self.filters.append(partial(apply_min_p, min_p=params.min_p))
        if 0 < params.top_k < vocab_size:
            self.filters.append(partial(apply_top_k, top_k=params.top_k))
        seed = params.seed if params.HasField("seed") else secrets.randbits(63)
        self.key = mx.random.key(seed)
        for _ in range(params.draws_done if self.temperature else 0):
            self.key, _ = mx.random.split(self.key)  # a replay continues the same stream
        self.history: mx.array | None = None

    def observe(self, tokens: list[int]) -> None:
        """Remember input tokens; mlx-lm keeps them only when a processor needs them."""
        if self.processors and tokens:
            new = mx.array(tokens, dtype=mx.uint32)
            self.history = new if self.history is None else mx.concatenate([self.history, new])

    def sample(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        """Lazy (token, logprobs) for logits of shape [1, vocab]."""
        if self.processors and self.history is not None:
            for processor in self.processors:
                logits = processor(self.history, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        if self.temperature == 0:
            return mx.argmax(logprobs, axis=-1), logprobs
        filtered = logprobs
        for apply_filter in self.filters:
            filtered = apply_filter(filtered)
        self.key, subkey = mx.random.split(self.key)
        token = mx.random.categorical(filtered * (1.0 / self.temperature), key=subkey)
        return token, logprobs

    def describe(self, token: mx.array, logprobs: mx.array) -> Sample:
        """Evaluate one sampled step into plain numbers, with top log-probabilities if asked."""
        token_id = int(token.item())
        logprob = float(logprobs[0, token_id].item()) if self.params.logprobs else 0.0
        top_ids: list[int] = []
        top_values: list[float] = []
        n = min(self.params.top_logprobs, MAX_TOP_LOGPROBS) if self.params.logprobs else 0
        if n > 0:
            row = logprobs[0]
            top = mx.argpartition(-row, kth=n - 1)[:n]
            values = row[top]
            order = mx.argsort(-values)
            top_ids = top[order].tolist()
            top_values = values[order].astype(mx.float32).tolist()
        return Sample(token_id, logprob, top_ids, top_values)
