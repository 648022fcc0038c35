"""The entry's decisions, as pure functions of plain data.

Whether a request is admitted, which ring it may start on, whether a failed request is
replayed, which steps carry its prompt (and, on a replay, the tokens generated so far), and
what to do with each token that comes back. No I/O, no clocks, no event loop: the entry
(`dnet/entry/entry.py`) waits and sends, and asks these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring.frames import Opening, RequestStep

# Tokens per prefill chunk. Identity with mlx-lm holds against its generate_step run with the
# same prefill_step_size. 512, measured (README "Performance"): a chunk's stages overlap across
# the ring, so an 8192-token prompt on two stages takes about (16 + 1) / 32 of one stage's time
# rather than (4 + 1) / 8 with 2048, and on one node 512-token chunks cost no more CPU than 2048.
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


def prompt_steps(request_id: str, prompt: list[int], generated: list[int],
                 sampling: pb.SamplingParams, *, entry: str, view: RingView,
                 chunk: int = PREFILL_CHUNK) -> list[RequestStep]:
    """The steps that carry a request into the ring, in order.

    All but the last prompt token fill the KV caches in chunks of `chunk`; the last one runs
    alone and is sampled, as in mlx-lm's generate_step. A replay then feeds each generated
    token alone, as the decode steps did, and samples after the last one. Raises ValueError
    for an empty prompt or a chunk size below 1.
    """
    if not prompt or chunk < 1:
        raise ValueError("a request needs a prompt and a positive chunk size")
    prefix = prompt[:-1]
    chunks = [prefix[i:i + chunk] for i in range(0, len(prefix), chunk)]
    chunks += [[token] for token in [prompt[-1], *generated]]
    steps, position = [], 0
    for i, tokens in enumerate(chunks):
        opening = Opening(sampling) if position == 0 else None
        steps.append(RequestStep(request_id, 0, position, tuple(tokens), None,
                                 i == len(chunks) - 1, entry, view.head, view.epoch, opening))
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
    if token.index < expected:
        return Verdict.SKIP
    return Verdict.EMIT


def failure_status(token: pb.Token) -> int:
    """The HTTP status of a failure token (503 when the shard gave none)."""
    return token.error_code or 503


def next_moving_average(average_s: float, gap_s: float) -> float:
    """The decode time per token after a new gap between tokens (an EMA, weight 0.2)."""
    return gap_s if not average_s else 0.8 * average_s + 0.2 * gap_s
