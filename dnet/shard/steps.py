"""One step through a shard's layers: which rows are live, which caches they run on, and
what comes out. Compute only, on the compute thread: `StepRunner.run` returns what is to be
sent (an `Outcome`) and the runtime sends it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import mlx.core as mx

from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring import codec, frames
from dnet.ring.frames import RequestStep, Step, TrainStep
from dnet.sampling import TokenSampler, grammar_tokenizer
from dnet.shard import decisions
from dnet.shard.decisions import KvRefusal, Move
from dnet.shard.requests import (
    ActiveRequest,
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
class Filled:
    """A prompt chunk filled the KV caches at the model's end; nothing goes on."""


@dataclass(frozen=True)
class Dropped:
    """Every row of the step was released while it waited; nothing ran."""


Outcome = Forward | TailOutput | Refused | Filled | Dropped


class StepRunner:
    """Runs steps through `stage`, opening requests at their first step.

    `tail` is set on the shard that holds the model's last layer; `identity` is this shard's
    name in a first step's route; `clock` gives the time requests are used at.
    """

    def __init__(self, stage: Stage, requests: RequestTable, trains: TrainCaches,
                 kv: KvReservations, tail: Tail | None, vocab_size: int, identity: str,
                 clock: Callable[[], float]) -> None:
        self.stage = stage
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
            if refusal is not None:
                return Refused(step.request_id, step.entry, refusal)
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
        sample = isinstance(step, TrainStep) or step.sample
        move = decisions.after_run(end, self.stage.num_layers, sample)
        if move is Move.FORWARD:
            mx.eval(h)
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
        mx.eval([cache.state for cache in caches.values()])
        return Filled()

    def _input(self, step: Step, tokens: tuple[tuple[int, ...], ...],
               live: list[int] | None) -> mx.array:
        """The step's input, [rows, tokens, hidden]: embedded token ids at layer 0, else the
        activations off the wire (only the `live` rows, when some were released)."""
        if step.hidden is None:
            return self.stage.embed(mx.array([list(t) for t in tokens], dtype=mx.uint32))
        h = codec.decode(step.hidden)
        return h if live is None else h[mx.array(live)]

    def _open(self, step: RequestStep) -> KvRefusal | None:
        """Open a request at its first step, unless its KV cache would pass the cap."""
        assert step.opening is not None
        sampling: pb.SamplingParams = step.opening.sampling
        refusal = self._kv.reserve(step.request_id, self.stage.kv_bytes(sampling.max_context))
        if refusal is not None:
            return refusal
        tail = None
        if self.stage.holds_head:
            sampler = TokenSampler(sampling, self._vocab_size, partial(
                grammar_tokenizer, self.stage.model_dir, self._vocab_size))
            tail = TailState(sampler, sampling.max_tokens,
                             frozenset(sampling.eos_token_ids))
        self._requests.open(step.request_id, ActiveRequest(
            entry=step.entry, head=step.head, epoch=step.epoch,
            kv=OwnCaches(self.stage.new_caches()), tail=tail), self._clock())
        return None
