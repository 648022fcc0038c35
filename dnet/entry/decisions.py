"""The entry's decisions, as pure functions of plain data.

Whether a request is admitted, which ring it may start on, whether a failed request is
replayed, which steps carry its prompt (and, on a replay, the tokens generated so far), and
what to do with each token that comes back. No I/O, no clocks, no event loop: the entry
(`dnet/entry/entry.py`) waits and sends, and asks these.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from dnet.prefix.index import ROOT
from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring.frames import CacheBlock, Opening, RequestStep

# Tokens per prefill chunk, and so per prefix-cache block (`--prefill-chunk`). Identity with
# mlx-lm holds against its generate_step run with the same prefill_step_size. 512, measured
# (README "Performance"): a chunk's stages overlap across the ring, so an 8192-token prompt on
# two stages takes about (16 + 1) / 32 of one stage's time rather than (4 + 1) / 8 with 2048,
# and on one node 512-token chunks cost no more CPU than 2048.
PREFILL_CHUNK = 512
MAX_REPLAYS = 3
DEFAULT_MAX_REQUESTS = 64
REPLAYABLE_STATUSES = frozenset({502, 503})
REPLANNING = "the mesh is re-planning; please retry"


@dataclass(frozen=True)
class Refusal:
    """A request the entry will not run: the HTTP status and why."""

    status: int
    message: str


def admission(active: int, max_requests: int, listening: bool) -> Refusal | None:
    """None if one more request may start next to `active` ones.

    Refused: 503 while the token sink is not listening (no tokens could come back), 429 at
    `max_requests` requests.
    """
    if not listening:
        return Refusal(503, "the token sink is not listening yet")
    if active >= max_requests:
        return Refusal(429, f"this node already serves {active} requests "
                            f"(--max-requests {max_requests}); retry shortly")
    return None


@dataclass(frozen=True)
class RingView:
    """The ring an entry sends to: its head shard and plan epoch, and whether it admits."""

    head: str
    epoch: int
    admitting: bool  # false while the mesh re-plans: new requests wait


def admits(view: RingView) -> bool:
    """Whether a new request may start on `view` now."""
    return view.admitting


def replaces(failed_epoch: int, view: RingView) -> bool:
    """Whether `view` is a ring a request that failed on `failed_epoch` may be replayed on."""
    return view.admitting and view.epoch > failed_epoch


def should_replay(recover: bool, status: int, failures: int) -> bool:
    """Whether a request the ring failed with `status` (its `failures`th failure) is replayed.

    Only in recovery mode (a mesh that re-plans), only for a ring that broke (502, 503), and
    at most MAX_REPLAYS times.
    """
    return recover and status in REPLAYABLE_STATUSES and failures <= MAX_REPLAYS


def replay_sampling(sampling: pb.SamplingParams, generated: int) -> pb.SamplingParams:
    """The sampling parameters of an attempt that starts `generated` tokens into the answer:
    that many fewer tokens to go, and that many random draws already made."""
    if not generated:
        return sampling
    params = pb.SamplingParams()
    params.CopyFrom(sampling)
    params.max_tokens = sampling.max_tokens - generated
    params.draws_done = generated
    return params


def may_reuse_prefix(sampling: pb.SamplingParams) -> bool:
    """Whether a request may start from cached prefix blocks: not when it scores its prompt
    (echo with logprobs), whose every token must pass the tail."""
    return not sampling.prompt_logprobs


def needs_history(sampling: pb.SamplingParams) -> bool:
    """Whether the tail's sampler needs the prompt tokens (its penalties look back over the
    history, as mlx-lm's logits processors do), so an opening past a reused prefix must carry
    them."""
    return bool(sampling.repetition_penalty or sampling.presence_penalty
                or sampling.frequency_penalty)


def prompt_steps(request_id: str, prompt: list[int], generated: list[int],
                 sampling: pb.SamplingParams, *, entry: str, view: RingView,
                 chunk: int = PREFILL_CHUNK, keys: Sequence[bytes] = (),
                 reused: int = 0) -> list[RequestStep]:
    """The steps that carry a request into the ring, in order.

    All but the last prompt token fill the KV caches in chunks of `chunk`; the last one runs
    alone and is sampled, as in mlx-lm's generate_step. A replay then feeds each generated
    token alone, as the decode steps did, and samples after the last one.

    `keys` are the prompt's block keys (`dnet.prefix.index.block_keys` with this chunk): each
    full chunk names the block it leaves, so shards cache it. With `reused` blocks restored
    from the shards' prefix caches, the steps start at `reused * chunk`: the chunks that follow
    are exactly those of an uncached run. Raises ValueError for an empty prompt, a chunk size
    below 1 or more reused blocks than keys.
    """
    if not prompt or chunk < 1 or not 0 <= reused <= len(keys):
        raise ValueError("a request needs a prompt, a positive chunk size and no more reused "
                         "blocks than block keys")
    start = reused * chunk
    prefix = prompt[:-1]
    chunks = [prefix[i:i + chunk] for i in range(start, len(prefix), chunk)]
    filling = len(chunks)
    chunks += [[token] for token in [prompt[-1], *generated]]
    history = tuple(prompt[:start]) if reused and needs_history(sampling) else ()
    steps, position = [], start
    for i, tokens in enumerate(chunks):
        opening = Opening(sampling, (), chunk, reused, history) if position == start else None
        block, k = None, position // chunk
        if i < filling and len(tokens) == chunk and k < len(keys):
            block = CacheBlock(keys[k], keys[k - 1] if k else ROOT, k == len(keys) - 1)
        steps.append(RequestStep(request_id, 0, position, tuple(tokens), None,
                                 i == len(chunks) - 1, entry, view.head, view.epoch, opening,
                                 block))
        position += len(tokens)
    return steps


class Verdict(enum.Enum):
    """What an attempt does with a token from the ring."""

    EMIT = "emit"
    SKIP = "skip"  # a duplicate: never emit a token twice
    FAIL = "fail"  # the ring failed the request


def judge(token: pb.Token, expected: int) -> Verdict:
    """The verdict on `token` when the attempt expects index `expected` next."""
    if token.error:
        return Verdict.FAIL
    if token.lookup or token.index < expected:
        return Verdict.SKIP
    return Verdict.EMIT


def failure_status(token: pb.Token) -> int:
    """The HTTP status of a failure token (503 when the shard gave none)."""
    return token.error_code or 503


def next_moving_average(average_s: float, gap_s: float) -> float:
    """The decode time per token after a new gap between tokens (an EMA, weight 0.2)."""
    return gap_s if not average_s else 0.8 * average_s + 0.2 * gap_s
