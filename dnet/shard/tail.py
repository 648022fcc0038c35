"""The tail: sample each row, stream tokens to their entries, send the next steps to the head.

The next decode step goes straight to the shard holding layer 0 (or into this shard's own
inbox when it holds layer 0 too); the entry node is never an extra hop per token. Which
requests travel together as a train is the TrainScheduler's call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from dnet.proto import dnet_ring_pb2 as pb
from dnet.shard.frames import Rows
from dnet.shard.groups import batchable
from dnet.shard.trains import DEFAULT_MAX_BATCH, Dispatch, TrainScheduler
from dnet.stage import Stage


@dataclass
class TailState:
    """What the tail keeps per request between its steps."""

    generated: int = 0
    next_token: int = -1
    next_position: int = 0


class Tail:
    def __init__(self, stage: Stage, requests: Callable[[str], object | None],
                 send_step: Callable[[str, pb.Frame], None],
                 send_token: Callable[[str, pb.Token], None]) -> None:
        self.stage = stage
        self._requests = requests  # request id -> ActiveRequest, or None once released
        self._send_step = send_step  # (head address, frame); "" means this shard's inbox
        self._send_token = send_token
        # Models whose caches cannot batch exactly (sliding windows) decode one per frame.
        self.scheduler = TrainScheduler(
            max_batch=DEFAULT_MAX_BATCH if batchable(stage.cache_templates) else 1)

    def count_stages(self, route: list[str], me: str) -> None:
        """A request's first frame lists the shards it passed: one train per stage."""
        self.scheduler.max_trains = max(self.scheduler.max_trains, len(set(route) | {me}))

    def observe(self, rows: Rows, requests: list, h: mx.array | None = None) -> None:
        """A prompt chunk reached the end of the model: remember its tokens (penalties), and
        score them when the request asked for prompt log-probabilities (`h` is the last
        layer's output for a prefill chunk, None for a sampled step)."""
        for request, tokens in zip(requests, rows.tokens, strict=True):
            request.sampler.observe(tokens)
            scorer = request.sampler.scorer
            if scorer is not None and h is not None:
                scorer.add_chunk(tokens, h, self.stage.logits)
            elif scorer is not None:
                scorer.add_last(tokens[-1])

    def finish(self, frame: pb.Frame, rows: Rows, requests: list, h: mx.array) -> None:
        """A decode step reached the end of the model: sample every row, send the results."""
        self.observe(rows, requests)
        logits = self.stage.logits(h)
        drawn = [request.sampler.sample(logits[i:i + 1]) for i, request in enumerate(requests)]
        mx.eval([token for token, _ in drawn])
        tokens: list[tuple[object, pb.Token]] = []
        continuing: list[str] = []
        for i, (request, (token, logprobs)) in enumerate(zip(requests, drawn, strict=True)):
            sample = request.sampler.describe(token, logprobs)
            state = request.tail
            index = state.generated
            state.generated += 1
            finish = ""
            if sample.token in request.eos_token_ids or sample.grammar_done:
                finish = "stop"
            elif state.generated >= request.max_tokens:
                finish = "length"
            else:
                state.next_token = sample.token
                state.next_position = rows.positions[i] + rows.tokens_per_row
                continuing.append(rows.request_ids[i])
            tokens.append((request, pb.Token(
                request_id=rows.request_ids[i], index=index, token=sample.token,
                logprob=sample.logprob, top_ids=sample.top_ids,
                top_logprobs=sample.top_logprobs, finish_reason=finish,
                prompt_logprobs=request.sampler.take_prompt_logprobs())))
        if frame.batch or frame.request_id in self.scheduler.trains:
            dispatches = self.scheduler.passed(frame.request_id, continuing)
        else:  # a request's first token: it starts or waits for a train
            dispatches = self.scheduler.ready(frame.request_id) if continuing else []
        # The next steps first: they are on the critical path, the clients' copies are not.
        for dispatch in dispatches:
            self._dispatch(dispatch, frame.epoch)
        for request, token in tokens:
            self._send_token(request.entry, token)

    def forget(self, request_id: str) -> None:
        self.scheduler.forget(request_id)
        for dispatch in self.scheduler.drain_waiting():
            request = self._requests(dispatch.members[0])
            if request is not None:
                self._dispatch(dispatch, request.epoch)

    def _dispatch(self, dispatch: Dispatch, epoch: int) -> None:
        members = [(m, self._requests(m)) for m in dispatch.members]
        members = [(m, r) for m, r in members if r is not None]
        if not members:
            return
        head = members[0][1].head
        if not dispatch.batched:
            request_id, request = members[0]
            frame = pb.Frame(request_id=request_id, next_layer=0,
                             position=request.tail.next_position,
                             tokens=[request.tail.next_token], sample=True,
                             entry=request.entry, head=head, epoch=epoch)
        else:
            frame = pb.Frame(request_id=dispatch.train_id, next_layer=0, sample=True,
                             batch=[m for m, _ in members],
                             batch_positions=[r.tail.next_position for _, r in members],
                             tokens=[r.tail.next_token for _, r in members],
                             head=head, epoch=epoch)
        self._send_step("" if self.stage.holds_embedding else head, frame)
