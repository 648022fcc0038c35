"""Frames, the ring's unit of work: their kinds, and the one place that builds and checks them.

A `pb.Frame` on the wire is one of four kinds (the conventions are also written in
`proto/dnet_ring.proto`):

- a **request step**: one request's prompt chunk or one decode token. `request_id`,
  `next_layer` (the receiver runs its contiguous run of layers from there), `position` (the
  KV position of the first token), `tokens`, `hidden` (absent exactly when `next_layer` is
  0), `sample` (the tail samples after it; false for prefill chunks), `entry`, `head`,
  `epoch`. The request's first step is its *opening*: it carries `sampling`, `route` and
  what the prefix cache needs (`block_size`, `reused_blocks`, `history`), and starts at
  position 0, or past the prefix every shard restores from its cache (`reused_blocks *
  block_size`, with `opens` set: a step past 0 opens its request only so). A full prefill
  chunk names the cache `block` it leaves.
- a **train step**: the decode steps of several requests moving as one batch. `request_id`
  is then the *train's* id, `batch` the member request ids, `batch_positions` and `tokens`
  one per member, `hidden` one row per member; always sampled; no `entry` (the tail knows
  each member's), no `sampling`.
- a **release** (`kind` RELEASE): drop `request_id`'s KV cache; the receiver passes it on
  from the run that starts at `next_layer`.
- a **lookup** (`kind` LOOKUP): how many leading blocks of a prompt (`block_keys`) every
  shard can restore from its prefix cache. Each shard pins what it can for `request_id` and
  passes the lookup on like a release, with `reused_blocks` the least depth so far; the
  shard that ends the model answers the entry with a `lookup_reply` token.

Shards, the tail and the entry work on the typed messages below and turn them into frames
only with `to_wire`; frames off the wire become typed messages only through `parse`, which
rejects malformed ones. No MLX here: parsing runs on gRPC threads, and the HTTP side imports
it. This module is on the hot path (a frame per token per hop), so it does no more than a
few field copies.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from dnet.proto import dnet_ring_pb2 as pb

# The dtypes hidden states travel in, and the bytes per element of each.
WIRE_DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}


class Status(enum.IntEnum):
    """The gRPC status codes a frame can be rejected with (values of grpc.StatusCode)."""

    NOT_FOUND = 5
    INVALID_ARGUMENT = 3
    FAILED_PRECONDITION = 9


class FrameRejected(Exception):
    """A frame is malformed or not for this shard; `code` says which, for the sender."""

    def __init__(self, code: Status, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FinishReason(enum.Enum):
    """Why a token is a request's last; its value is what `pb.Token.finish_reason` carries."""

    NONE = ""
    STOP = "stop"  # an end-of-sequence token
    LENGTH = "length"  # max_tokens reached


@dataclass(frozen=True, slots=True)
class Rows:
    """The requests a step carries, one row each: its KV position and its input tokens."""

    request_ids: tuple[str, ...]
    positions: tuple[int, ...]
    tokens: tuple[tuple[int, ...], ...]

    @property
    def tokens_per_row(self) -> int:
        return len(self.tokens[0])

    def select(self, keep: list[int]) -> Rows:
        """The rows at indices `keep`, in that order."""
        return Rows(tuple(self.request_ids[i] for i in keep),
                    tuple(self.positions[i] for i in keep),
                    tuple(self.tokens[i] for i in keep))


@dataclass(frozen=True, slots=True)
class Opening:
    """What only a request's first step carries.

    The step starts at `reused_blocks * block_size`: every shard first restores the prompt's
    first `reused_blocks` blocks from its prefix cache (pinned by a lookup). `history` holds
    the reused prompt tokens when the request's sampler needs them (penalties), as the tail
    would otherwise have seen them pass.
    """

    sampling: pb.SamplingParams
    route: tuple[str, ...] = ()  # the shards the frame passed, so the tail counts stages
    block_size: int = 0  # the entry's prefill chunk, in tokens (0: no prompt chunking known)
    reused_blocks: int = 0
    history: tuple[int, ...] = ()

    @property
    def start(self) -> int:
        """The KV position the request opens at."""
        return self.reused_blocks * self.block_size


@dataclass(frozen=True, slots=True)
class CacheBlock:
    """The prefix-cache block a full prefill chunk leaves: its key, its parent's (empty for a
    prompt's first), and whether recurrent-state layers keep a snapshot at its end."""

    key: bytes
    parent: bytes
    snapshot: bool = False


@dataclass(frozen=True, slots=True)
class RequestStep:
    """One request's prompt chunk (`sample` false) or decode step (`sample` true)."""

    request_id: str
    layer: int  # the receiver runs its run of layers from here; 0 means `tokens` are input
    position: int  # KV position of the first token
    tokens: tuple[int, ...]
    hidden: pb.Tensor | None  # [1, len(tokens), hidden] activations; None when layer == 0
    sample: bool
    entry: str  # host:port of the entry's token sink
    head: str  # host:port of the shard holding layer 0
    epoch: int
    opening: Opening | None  # set on the request's first step only
    block: CacheBlock | None = None  # set on a full prefill chunk

    def __post_init__(self) -> None:
        first = self.position > 0 if self.opening is None else (
            self.position == self.opening.start)
        if not first or (self.hidden is None) != (self.layer == 0):
            raise ValueError("a request step carries its opening exactly at its first "
                             "position (0, or past its reused prefix), and hidden states "
                             "exactly when it does not start at layer 0")
        if self.block is not None and self.sample:
            raise ValueError("only prefill chunks leave prefix-cache blocks")

    @property
    def rows(self) -> Rows:
        return Rows((self.request_id,), (self.position,), (self.tokens,))


@dataclass(frozen=True, slots=True)
class TrainStep:
    """One decode step of every member of a train, as one batch; always sampled."""

    train_id: str
    layer: int
    members: tuple[str, ...]
    positions: tuple[int, ...]  # each member's KV position, >= 1
    tokens: tuple[int, ...]  # each member's input token
    hidden: pb.Tensor | None  # [members, 1, hidden]; None when layer == 0
    head: str
    epoch: int

    def __post_init__(self) -> None:
        if not len(self.members) == len(self.positions) == len(self.tokens) or (
                (self.hidden is None) != (self.layer == 0)):
            raise ValueError("a train step carries one position and one token per member, and "
                             "hidden states exactly when it does not start at layer 0")

    @property
    def rows(self) -> Rows:
        return Rows(self.members, self.positions, tuple((t,) for t in self.tokens))

    def select(self, keep: list[int], hidden: pb.Tensor | None) -> TrainStep:
        """The members at indices `keep` (in order), with their rows of `hidden`."""
        return TrainStep(self.train_id, self.layer, tuple(self.members[i] for i in keep),
                         tuple(self.positions[i] for i in keep),
                         tuple(self.tokens[i] for i in keep), hidden, self.head, self.epoch)


@dataclass(frozen=True, slots=True)
class Release:
    """Drop a request's KV cache; pass the release on from the run starting at `layer`."""

    request_id: str
    layer: int | None  # None: drop it here only
    head: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Lookup:
    """How many of `keys` (a prompt's block keys, in order) every shard can restore.

    Each shard pins the blocks it can restore for `request_id` and passes the lookup on from
    the run starting at `layer`, with `depth` the least depth so far (at most len(keys)).
    """

    request_id: str
    layer: int
    keys: tuple[bytes, ...]
    depth: int
    entry: str
    head: str
    epoch: int

    def __post_init__(self) -> None:
        if not 0 <= self.depth <= len(self.keys):
            raise ValueError("a lookup's depth is between 0 and its number of keys")


Step = RequestStep | TrainStep
Message = RequestStep | TrainStep | Release | Lookup


@dataclass(frozen=True, slots=True)
class ShardView:
    """What a shard checks incoming frames against."""

    epoch: int
    held: frozenset[int]  # every layer the shard holds (a frame may start at any of them)
    vocab_size: int
    hidden_size: int


# ----- building ----------------------------------------------------------------------------


def to_wire(message: Message) -> pb.Frame:
    """The frame that carries `message`."""
    if isinstance(message, RequestStep):
        frame = pb.Frame(request_id=message.request_id, next_layer=message.layer,
                         position=message.position, tokens=message.tokens,
                         sample=message.sample, entry=message.entry, head=message.head,
                         epoch=message.epoch)
        if message.hidden is not None:
            frame.hidden.CopyFrom(message.hidden)
        opening = message.opening
        if opening is not None:
            frame.opens = True
            frame.sampling.CopyFrom(opening.sampling)
            frame.route.extend(opening.route)
            frame.block_size = opening.block_size
            frame.reused_blocks = opening.reused_blocks
            frame.history.extend(opening.history)
        if message.block is not None:
            frame.block.key = message.block.key
            frame.block.parent = message.block.parent
            frame.block.snapshot = message.block.snapshot
        return frame
    if isinstance(message, TrainStep):
        frame = pb.Frame(request_id=message.train_id, next_layer=message.layer,
                         tokens=message.tokens, sample=True, head=message.head,
                         epoch=message.epoch, batch=message.members,
                         batch_positions=message.positions)
        if message.hidden is not None:
            frame.hidden.CopyFrom(message.hidden)
        return frame
    if isinstance(message, Lookup):
        return pb.Frame(request_id=message.request_id, kind=pb.LOOKUP, next_layer=message.layer,
                        block_keys=message.keys, reused_blocks=message.depth,
                        entry=message.entry, head=message.head, epoch=message.epoch)
    return pb.Frame(request_id=message.request_id, kind=pb.RELEASE,
                    next_layer=-1 if message.layer is None else message.layer,
                    head=message.head, epoch=message.epoch)


def next_hop(step: Step, layer: int, hidden: pb.Tensor, route_via: str) -> Step:
    """`step` after this shard ran it: to continue at `layer` with activations `hidden`.

    `route_via` is this shard's identity, added to a request's route on its first step.
    """
    if isinstance(step, TrainStep):
        return TrainStep(step.train_id, layer, step.members, step.positions, step.tokens,
                         hidden, step.head, step.epoch)
    opening = step.opening
    if opening is not None:
        opening = Opening(opening.sampling, (*opening.route, route_via), opening.block_size,
                          opening.reused_blocks, opening.history)
    return RequestStep(step.request_id, layer, step.position, step.tokens, hidden, step.sample,
                       step.entry, step.head, step.epoch, opening, step.block)


def token(request_id: str, index: int, token_id: int, *, logprob: float = 0.0,
          top_ids: list[int] | None = None, top_logprobs: list[float] | None = None,
          finish: FinishReason = FinishReason.NONE,
          prompt_logprobs: list[pb.PromptLogprob] | None = None) -> pb.Token:
    """A sampled token for a request's entry; the first may carry the prompt's scores."""
    return pb.Token(request_id=request_id, index=index, token=token_id, logprob=logprob,
                    top_ids=top_ids or [], top_logprobs=top_logprobs or [],
                    finish_reason=finish.value, prompt_logprobs=prompt_logprobs or [])


def lookup_reply(request_id: str, reused_blocks: int) -> pb.Token:
    """The answer to a lookup: every shard can restore the first `reused_blocks` blocks."""
    return pb.Token(request_id=request_id, lookup=True, reused_blocks=reused_blocks)


def failure(request_id: str, status: int, message: str) -> pb.Token:
    """The token that tells an entry the ring failed a request (`status` is HTTP-style)."""
    return pb.Token(request_id=request_id, error=message, error_code=status)


# ----- checking ----------------------------------------------------------------------------


def parse(frame: pb.Frame, shard: ShardView) -> Message:
    """The typed message of a frame sent to `shard`; raises FrameRejected if malformed.

    Rejections: no request id, or a step without tokens (INVALID_ARGUMENT); another plan
    epoch, or a layer the shard does not hold (FAILED_PRECONDITION); token ids outside the
    vocabulary, train fields that do not line up, or hidden states of the wrong dtype, shape
    or byte count (INVALID_ARGUMENT).
    """
    if not frame.request_id:
        raise FrameRejected(Status.INVALID_ARGUMENT, "frame has no request_id")
    if frame.epoch != shard.epoch:
        raise FrameRejected(Status.FAILED_PRECONDITION, f"frame of plan epoch {frame.epoch}; "
                                                        f"this shard serves epoch {shard.epoch}")
    if frame.kind == pb.RELEASE:
        return Release(frame.request_id, frame.next_layer if frame.next_layer >= 0 else None,
                       frame.head, frame.epoch)
    if frame.next_layer not in shard.held:
        raise FrameRejected(Status.FAILED_PRECONDITION,
                            f"this shard does not hold layer {frame.next_layer} "
                            f"(it holds {sorted(shard.held)})")
    if frame.kind == pb.LOOKUP:
        return _lookup(frame)
    if not frame.tokens:
        raise FrameRejected(Status.INVALID_ARGUMENT, "frame carries no tokens")
    rows = 1
    if frame.batch:
        rows = len(frame.batch)
        if len(frame.tokens) != rows or len(frame.batch_positions) != rows:
            raise FrameRejected(Status.INVALID_ARGUMENT,
                                "a train needs one token and one position per member")
        if len(set(frame.batch)) != rows or any(p < 1 for p in frame.batch_positions):
            raise FrameRejected(Status.INVALID_ARGUMENT,
                                "train members must be distinct requests past their prompt")
    hidden = None
    if frame.next_layer == 0:
        bad = [t for t in frame.tokens if not 0 <= t < shard.vocab_size]
        if bad:
            raise FrameRejected(Status.INVALID_ARGUMENT,
                                f"token ids out of range 0..{shard.vocab_size - 1}: {bad[:5]}")
    else:
        hidden = frame.hidden
        check_hidden(hidden, rows, len(frame.tokens) // rows, shard.hidden_size)
    if frame.batch:
        return TrainStep(frame.request_id, frame.next_layer, tuple(frame.batch),
                         tuple(frame.batch_positions), tuple(frame.tokens), hidden,
                         frame.head, frame.epoch)
    # Position 0 is only ever a request's first step; past it, `opens` says so.
    opening = _opening(frame, shard) if frame.opens or frame.position == 0 else None
    block = None
    if frame.HasField("block"):
        if not frame.block.key or frame.sample:
            raise FrameRejected(Status.INVALID_ARGUMENT,
                                "a cache block needs a key and a prefill chunk")
        block = CacheBlock(frame.block.key, frame.block.parent, frame.block.snapshot)
    if opening is not None and frame.position != opening.start:
        raise FrameRejected(Status.INVALID_ARGUMENT,
                            f"a request opens at position 0 or past its reused prefix "
                            f"({opening.start}); this opening is at {frame.position}")
    return RequestStep(frame.request_id, frame.next_layer, frame.position, tuple(frame.tokens),
                       hidden, frame.sample, frame.entry, frame.head, frame.epoch, opening, block)


def _opening(frame: pb.Frame, shard: ShardView) -> Opening:
    if frame.reused_blocks < 0 or frame.block_size < 0 or (
            frame.reused_blocks and not frame.block_size):
        raise FrameRejected(Status.INVALID_ARGUMENT,
                            "reused_blocks and block_size must be >= 0, block_size > 0 with "
                            "reused blocks")
    bad = [t for t in frame.history if not 0 <= t < shard.vocab_size]
    if bad:
        raise FrameRejected(Status.INVALID_ARGUMENT,
                            f"history token ids out of range 0..{shard.vocab_size - 1}: "
                            f"{bad[:5]}")
    return Opening(frame.sampling, tuple(frame.route), frame.block_size, frame.reused_blocks,
                   tuple(frame.history))


def _lookup(frame: pb.Frame) -> Lookup:
    keys = tuple(frame.block_keys)
    if not keys or not all(keys) or not 0 <= frame.reused_blocks <= len(keys):
        raise FrameRejected(Status.INVALID_ARGUMENT,
                            "a lookup needs block keys and a depth between 0 and their number")
    return Lookup(frame.request_id, frame.next_layer, keys, frame.reused_blocks, frame.entry,
                  frame.head, frame.epoch)


def check_hidden(tensor: pb.Tensor, rows: int, tokens_per_row: int, hidden_size: int) -> None:
    """Raise FrameRejected (INVALID_ARGUMENT) unless `tensor` is well-formed hidden states
    of shape [rows, tokens_per_row, hidden_size] in a wire dtype."""
    width = WIRE_DTYPE_BYTES.get(tensor.dtype)
    if width is None:
        raise FrameRejected(Status.INVALID_ARGUMENT,
                            f"unsupported dtype {tensor.dtype!r}; "
                            f"expected one of {list(WIRE_DTYPE_BYTES)}")
    shape = tuple(tensor.shape)
    if len(shape) != 3 or shape[0] < 1 or shape[1] < 1 or shape[2] != hidden_size:
        raise FrameRejected(Status.INVALID_ARGUMENT,
                            f"hidden states must have shape [rows, tokens, {hidden_size}]; "
                            f"got {list(shape)}")
    expected = math.prod(shape) * width
    if len(tensor.data) != expected:
        raise FrameRejected(Status.INVALID_ARGUMENT,
                            f"tensor of shape {list(shape)} needs {expected} bytes; "
                            f"got {len(tensor.data)}")
    if shape[0] != rows or shape[1] != tokens_per_row:
        raise FrameRejected(Status.INVALID_ARGUMENT,
                            f"hidden states {list(shape)} do not match {rows} row(s) of "
                            f"{tokens_per_row} token(s)")
