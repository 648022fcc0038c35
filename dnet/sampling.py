"""Sampling at the tail, step for step what mlx-lm's generate_step does.

mlx-lm samples from the process-wide random state; a ring serves many requests at once, so
each request carries its own key. Splitting that key once per token reproduces the stream
`mx.random.seed(seed)` gives mlx-lm, so a seeded request samples the same tokens either way.

Two additions live here too, because only the tail sees logits:
- constrained sampling: an llguidance grammar (`SamplingParams.grammar`) masks the tokens
  that would leave it. Greedy picks the best allowed token; sampling first draws as it would
  without the grammar and draws again among the allowed tokens only if the grammar refuses
  that token. Either way the token the model would have chosen is still chosen whenever the
  grammar allows it, and sampling follows exactly the masked distribution;
- prompt log-probabilities (`SamplingParams.prompt_logprobs`), scored from the prompt
  chunks' hidden states, for `echo` with `logprobs`.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import mlx.core as mx
import numpy as np
from llguidance import LLMatcher, LLTokenizer
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from dnet.proto import dnet_ring_pb2 as pb

MAX_TOP_LOGPROBS = 20
SCORE_ROWS = 256  # prompt positions scored at once: [256, vocab] float logits at a time


class ConstraintError(RuntimeError):
    """The grammar could not be built, or the matcher left it (a bug, not the user's)."""


@lru_cache(maxsize=4)
def grammar_tokenizer(model_dir: Path, vocab_size: int) -> LLTokenizer:
    """llguidance's view of a model's tokenizer, with every end-of-sequence id the model
    declares; built once per model (about a second for a 150k vocabulary)."""
    from dnet.tokenizer import load_chat_tokenizer  # mlx-lm's tokenizer loading, tail only

    tokenizer = load_chat_tokenizer(model_dir)
    return LLTokenizer(tokenizer.backend_json(), n_vocab=vocab_size,
                       eos_token=sorted(tokenizer.eos_token_ids))


class GrammarConstraint:
    """One request's llguidance matcher: which tokens keep the answer inside the grammar."""

    def __init__(self, grammar: str, tokenizer: LLTokenizer, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.matcher = LLMatcher(tokenizer, grammar, log_level=0)
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ConstraintError(f"grammar: {self.matcher.get_error()}")

    def allowed(self) -> mx.array:
        """Bool mask of shape [vocab_size]: True where a token keeps the answer valid."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8),
                             bitorder="little")
        self._check()
        if bits.size < self.vocab_size:
            bits = np.pad(bits, (0, self.vocab_size - bits.size))
        return mx.array(bits[:self.vocab_size].astype(np.bool_))

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"token {token} left the grammar: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """Nothing but an end-of-sequence token can follow: the answer is complete."""
        return self.matcher.is_stopped()


@dataclass
class Sample:
    token: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]
    grammar_done: bool = False  # the token completed the request's grammar


def top_entries(row: mx.array, n: int) -> tuple[list[int], list[float]]:
    """The n largest entries of a [vocab] row, largest first: (ids, values)."""
    top = mx.argpartition(-row, kth=n - 1)[:n]
    values = row[top]
    order = mx.argsort(-values)
    return top[order].tolist(), values[order].astype(mx.float32).tolist()


@dataclass
class PromptScorer:
    """Log-probabilities of prompt tokens given the tokens before them (for `echo`).

    Position p's logits score token p + 1, which may be the first token of the next chunk,
    so the last row of each chunk waits here for it. The first prompt token is not scored.
    """

    top_n: int
    entries: list[pb.PromptLogprob] = field(default_factory=list)
    _previous: mx.array | None = None  # [vocab] log-probabilities of the next prompt token
    _started: bool = False

    def add_chunk(self, tokens: list[int], hidden: mx.array,
                  head: Callable[[mx.array], mx.array]) -> None:
        """Score a prompt chunk from the last layer's output `hidden` [1, L, hidden] (any
        float dtype); `head` maps [n, 1, hidden] to logits [n, vocab] (the stage's norm and
        LM head). Holds the chunk's last row for the token after it."""
        rows = hidden.reshape(-1, 1, hidden.shape[-1])
        for start in range(0, len(tokens), SCORE_ROWS):
            logits = head(rows[start:start + SCORE_ROWS])
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            self._score(tokens[start:start + SCORE_ROWS], logprobs)

    def add_last(self, token: int) -> None:
        """The final prompt token, which runs alone and is sampled after: score it only."""
        self._score([token], None)

    def _score(self, tokens: list[int], logprobs: mx.array | None) -> None:
        """Score `tokens`, token k by row k - 1 of `logprobs` (the first by the held row)."""
        predictors = [] if self._previous is None else [self._previous[None]]
        if logprobs is not None:
            predictors.append(logprobs[:-1])
        if not self._started:
            self._started = True
            tokens = tokens[1:]
        if logprobs is not None:
            self._previous = logprobs[-1]
        if not tokens:
            return
        rows = mx.concatenate(predictors) if len(predictors) > 1 else predictors[0]
        rows = rows[-len(tokens):]
        ids = mx.array(tokens)
        chosen = mx.take_along_axis(rows, ids[:, None], axis=-1)[:, 0].astype(mx.float32)
        top_ids = top_values = None
        if self.top_n > 0:
            top = mx.argpartition(-rows, kth=self.top_n - 1, axis=-1)[:, :self.top_n]
            values = mx.take_along_axis(rows, top, axis=-1)
            order = mx.argsort(-values, axis=-1)
            top_ids = mx.take_along_axis(top, order, axis=-1)
            top_values = mx.take_along_axis(values, order, axis=-1).astype(mx.float32)
            mx.eval(chosen, top_ids, top_values, self._previous)
        else:
            mx.eval(chosen, self._previous)
        for k, (token, value) in enumerate(zip(tokens, chosen.tolist(), strict=True)):
            entry = pb.PromptLogprob(token=token, logprob=value)
            if top_ids is not None:
                entry.top_ids.extend(top_ids[k].tolist())
                entry.top_logprobs.extend(top_values[k].tolist())
            self.entries.append(entry)


class TokenSampler:
    """One request's sampler, logits processors, grammar and token history."""

    def __init__(self, params: pb.SamplingParams, vocab_size: int,
                 grammar_tokenizer: Callable[[], LLTokenizer] | None = None) -> None:
        self.params = params
        self.vocab_size = vocab_size
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
        self._grammar_tokenizer = grammar_tokenizer
        self.constraint: GrammarConstraint | None = None
        # A replay feeds the tokens generated so far as plain steps: the grammar replays them.
        self._replayed: deque[int] = deque(maxlen=params.draws_done or 0)
        self.scorer = (PromptScorer(min(params.top_logprobs, MAX_TOP_LOGPROBS))
                       if params.prompt_logprobs and not params.draws_done else None)

    def observe(self, tokens: list[int]) -> None:
        """Remember input tokens; mlx-lm keeps them only when a processor needs them."""
        if self.params.grammar:
            self._replayed.extend(tokens)
        if self.processors and tokens:
            new = mx.array(tokens, dtype=mx.uint32)
            self.history = new if self.history is None else mx.concatenate([self.history, new])

    def _grammar(self) -> GrammarConstraint | None:
        if not self.params.grammar or self.constraint is not None:
            return self.constraint
        if self._grammar_tokenizer is None:
            raise ConstraintError("this shard cannot apply grammars (no tokenizer)")
        self.constraint = GrammarConstraint(self.params.grammar, self._grammar_tokenizer(),
                                            self.vocab_size)
        for token in self._replayed:
            self.constraint.consume(token)
        self._replayed.clear()
        return self.constraint

    def sample(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        """Lazy (token, logprobs) for logits of shape [1, vocab]. The log-probabilities are
        the model's own (after the logits processors), never the grammar's."""
        if self.processors and self.history is not None:
            for processor in self.processors:
                logits = processor(self.history, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        constraint = self._grammar()
        allowed = constraint.allowed() if constraint is not None else None
        if self.temperature == 0:
            if allowed is not None:
                return mx.argmax(mx.where(allowed, logprobs, -mx.inf), axis=-1), logprobs
            return mx.argmax(logprobs, axis=-1), logprobs
        filtered = logprobs
        for apply_filter in self.filters:
            filtered = apply_filter(filtered)
        self.key, subkey = mx.random.split(self.key)
        scale = 1.0 / self.temperature
        token = mx.random.categorical(filtered * scale, key=subkey)
        if allowed is None:
            return token, logprobs
        # The draw the model makes without the grammar stands when the grammar allows it;
        # otherwise draw again among the allowed tokens (unfiltered if the filters left
        # none). P(t) = p(t) + p(refused) * p(t) / p(allowed) = p(t) / p(allowed): exactly
        # the masked distribution.
        masked = mx.where(allowed, filtered, -mx.inf)
        masked = mx.where(mx.any(masked > -mx.inf), masked, mx.where(allowed, logprobs, -mx.inf))
        again = mx.random.categorical(masked * scale, key=mx.random.split(subkey)[1])
        return mx.where(allowed[token], token, again), logprobs

    def describe(self, token: mx.array, logprobs: mx.array) -> Sample:
        """Evaluate one sampled step into plain numbers, with top log-probabilities if asked;
        advances the grammar past the token."""
        token_id = int(token.item())
        logprob = float(logprobs[0, token_id].item()) if self.params.logprobs else 0.0
        top_ids: list[int] = []
        top_values: list[float] = []
        n = min(self.params.top_logprobs, MAX_TOP_LOGPROBS) if self.params.logprobs else 0
        if n > 0:
            top_ids, top_values = top_entries(logprobs[0], n)
        done = False
        if self.constraint is not None:
            self.constraint.consume(token_id)
            done = self.constraint.done
        return Sample(token_id, logprob, top_ids, top_values, grammar_done=done)

    def take_prompt_logprobs(self) -> list[pb.PromptLogprob]:
        """The prompt's scores, once (they ride on the first generated token)."""
        if self.scorer is None:
            return []
        entries, self.scorer = self.scorer.entries, None
        return entries
