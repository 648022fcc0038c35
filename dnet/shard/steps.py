"""One step through a shard's layers: which rows are live, which caches they run on, and
what comes out. Compute only, on the compute thread: `StepRunner.run` returns what is to be
sent (an `Outcome`) and the runtime sends it. The prefix cache is used here too: a request
that opens past a reused prefix starts from the blocks its lookup pinned, and each full
prefill chunk leaves its block (`dnet.prefix.store`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import mlx.core as mx

from dnet.prefix.store import Cut, PrefixMiss, PrefixStore
from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring import codec, frames
from dnet.ring.frames import RequestStep, Step, TrainStep
from dnet.sampling import TokenSampler, grammar_tokenizer
from dnet.shard import decisions
from dnet.shard.decisions import KvRefusal, Move
from dnet.shard.requests import (
    ActiveRequest,
    Cache,
    KvReservations,
    OwnCaches,
    RequestTable,
    TailState,
    TrainCaches,
)
from dnet.shard.tail import Tail, TailOutput
from dnet.stage import Stage


@dataclass(frozen=True)
class Forward:
    """Activations for the shard that holds `step.layer`, on behalf of `requests`."""

    step: Step
    requests: list[ActiveRequest]


@dataclass(frozen=True)
class Refused:
    """A new request's KV cache does not fit here; its entry must be told."""

    request_id: str
    entry: str
    refusal: KvRefusal


@dataclass(frozen=True)
class Unrestorable:
    """A new request's reused prefix cannot be restored here; its entry must be told (a 503
    it may retry: a lookup pins the prefix, so this is not expected)."""

    request_id: str
    entry: str
    message: str


@dataclass(frozen=True)
class Filled:
    """A prompt chunk filled the KV caches at the model's end; nothing goes on."""


@dataclass(frozen=True)
class Dropped:
    """Every row of the step was released while it waited; nothing ran."""


Outcome = Forward | TailOutput | Refused | Unrestorable | Filled | Dropped


class StepRunner:
    """Runs steps through `stage`, opening requests at their first step.

    `tail` is set on the shard that holds the model's last layer; `identity` is this shard's
    name in a first step's route; `clock` gives the time requests are used at; `prefix` is
    the shard's prefix cache.
    """

    def __init__(self, stage: Stage, requests: RequestTable, trains: TrainCaches,
                 kv: KvReservations, tail: Tail | None, vocab_size: int, identity: str,
                 clock: Callable[[], float], prefix: PrefixStore | None = None) -> None:
        self.stage = stage
        self.prefix = prefix if prefix is not None else PrefixStore(0, {})  # None: no cache
        self._requests = requests
        self._trains = trains
        self._kv = kv
        self._tail = tail
        self._vocab_size = vocab_size
        self._identity = identity
        self._clock = clock

    def run(self, step: Step) -> Outcome:
        """Run `step`'s live rows through this shard's run of layers from `step.layer`.

        Raises RuntimeError when a row is not at the KV position its layer expects, or its
        caches are in another train (the runtime fails those requests).
        """
        if (isinstance(step, RequestStep) and step.opening is not None
                and step.request_id not in self._requests):
            refusal = self._open(step)
            if isinstance(refusal, KvRefusal):
                return Refused(step.request_id, step.entry, refusal)
            if refusal is not None:
                return Unrestorable(step.request_id, step.entry, str(refusal))
        rows = step.rows
        live = [i for i, r in enumerate(rows.request_ids) if r in self._requests]
        if not live:
            return Dropped()
        partial = len(live) < len(rows.request_ids)
        if partial:
            rows = rows.select(live)
        requests = [self._requests[r] for r in rows.request_ids]
        for request, position in zip(requests, rows.positions, strict=True):
            error = decisions.position_error(request.positions.get(step.layer, 0), position,
                                             step.layer)
            if error is not None:
                raise RuntimeError(error)
        self._requests.touch(rows.request_ids, self._clock())
        caches = self._trains.for_step(step, rows.request_ids, requests)
        h = self._input(step, rows.tokens, live if partial else None)
        h, end = self.stage.forward(h, step.layer, caches)
        for request, position in zip(requests, rows.positions, strict=True):
            request.positions[step.layer] = position + rows.tokens_per_row
        cut = self._cut(step, caches, end)
        kept = cut.arrays() if cut is not None else []
        sample = isinstance(step, TrainStep) or step.sample
        move = decisions.after_run(end, self.stage.num_layers, sample)
        if move is Move.FORWARD:
            mx.eval(h, *kept)
            self._offer(step, cut)
            hidden = codec.encode(h)
            out = frames.next_hop(step, end, hidden, self._identity)
            if isinstance(out, TrainStep) and partial:
                out = out.select(live, hidden)
            return Forward(out, requests)
        tail = self._tail
        assert tail is not None  # the shard that ends the model holds the head
        if isinstance(step, RequestStep) and step.opening is not None:
            tail.count_stages(step.opening.route, self._identity)
        if move is Move.SAMPLE:
            return tail.finish(step, rows, requests, h)
        # A prompt chunk needs only the KV caches, as in mlx-lm's prefill: the last layer's
        # attention output and MLP are never computed.
        tail.observe(rows, requests, h)
        mx.eval([cache.state for cache in caches.values()], *kept)
        self._offer(step, cut)
        return Filled()

    def _cut(self, step: Step, caches: dict[int, Cache], end: int) -> Cut | None:
        """A full prefill chunk's part of every layer just run (lazy copies, to evaluate
        with the step's output), when the prefix cache wants its block."""
        if not isinstance(step, RequestStep) or step.block is None:
            return None
        block = step.block
        if not self.prefix.wants(step.request_id, block.key, block.parent, block.snapshot):
            return None
        return self.prefix.cut(caches, range(step.layer, end), len(step.tokens),
                               block.snapshot)

    def _offer(self, step: Step, cut: Cut | None) -> None:
        if cut is not None and isinstance(step, RequestStep) and step.block is not None:
            self.prefix.offer(step.request_id, step.block.key, step.block.parent, cut,
                              self._clock())

    def _input(self, step: Step, tokens: tuple[tuple[int, ...], ...],
               live: list[int] | None) -> mx.array:
        """The step's input, [rows, tokens, hidden]: embedded token ids at layer 0, else the
        activations off the wire (only the `live` rows, when some were released)."""
        if step.hidden is None:
            return self.stage.embed(mx.array([list(t) for t in tokens], dtype=mx.uint32))
        h = codec.decode(step.hidden)
        return h if live is None else h[mx.array(live)]

    def _open(self, step: RequestStep) -> KvRefusal | PrefixMiss | None:
        """Open a request at its first step, unless its KV cache would pass the cap or its
        reused prefix cannot be restored. A request opening past a reused prefix starts from
        the blocks its lookup pinned here, every run of layers at that position."""
        opening = step.opening
        assert opening is not None
        sampling: pb.SamplingParams = opening.sampling
        refusal = self._kv.reserve(step.request_id, self.stage.kv_bytes(sampling.max_context))
        if refusal is not None:
            return refusal
        caches = self.stage.new_caches()
        positions: dict[int, int] = {}
        if opening.reused_blocks:
            try:
                caches = self.prefix.restore(step.request_id, opening.reused_blocks,
                                             step.position, caches)
            except (PrefixMiss, ValueError) as exc:
                self._kv.release(step.request_id)
                return exc if isinstance(exc, PrefixMiss) else PrefixMiss(str(exc))
            positions = {start: step.position for start, _ in self.stage.runs}
        else:
            self.prefix.forget(step.request_id)  # a lookup that found nothing pinned nothing
        tail = None
        if self.stage.holds_head:
            sampler = TokenSampler(sampling, self._vocab_size, partial(
                grammar_tokenizer, self.stage.model_dir, self._vocab_size))
            sampler.observe(list(opening.history))
            tail = TailState(sampler, sampling.max_tokens,
                             frozenset(sampling.eos_token_ids))
        self._requests.open(step.request_id, ActiveRequest(
            entry=step.entry, head=step.head, epoch=step.epoch,
            kv=OwnCaches(caches), tail=tail, positions=positions), self._clock())
        return None
