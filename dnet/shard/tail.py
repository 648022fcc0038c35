"""The tail: sample each row, and say which tokens go to entries and which steps to the head.

The tail is the shard that holds the model's last layer. After a sampled step it draws each
row's token, and answers with a `TailOutput`: the tokens for the requests' entries and the
next decode steps, which go straight to the shard holding layer 0 (the entry node is never
an extra hop per token). Which requests travel together as a train is the TrainScheduler's
call. The runtime sends what the tail returns; the tail itself does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring import frames
from dnet.ring.frames import FinishReason, RequestStep, Rows, Step, TrainStep
from dnet.shard.groups import batchable
from dnet.shard.requests import ActiveRequest, RequestTable, TailState
from dnet.shard.trains import DEFAULT_MAX_BATCH, Dispatch, TrainScheduler
from dnet.stage import Stage


@dataclass
class TailOutput:
    """What a tail step produced: the next decode steps, and tokens for entries."""

    steps: list[Step] = field(default_factory=list)
    tokens: list[tuple[str, pb.Token]] = field(default_factory=list)  # (entry, token)


def tail_state(request: ActiveRequest) -> TailState:
    if request.tail is None:
        raise RuntimeError("a request reached the tail without a sampler")
    return request.tail


class Tail:
    def __init__(self, stage: Stage, requests: RequestTable,
                 scheduler: TrainScheduler | None = None) -> None:
        self.stage = stage
        self._requests = requests
        # Models whose caches cannot batch exactly (sliding windows) decode one per frame.
        self.scheduler = scheduler or TrainScheduler(
            max_batch=DEFAULT_MAX_BATCH if batchable(stage.cache_templates) else 1)

    def count_stages(self, route: tuple[str, ...], me: str) -> None:
        """A request's first frame lists the shards it passed: one train per stage."""
        self.scheduler.count_stages(len(set(route) | {me}))

    def observe(self, rows: Rows, requests: list[ActiveRequest],
                h: mx.array | None = None) -> None:
        """Input tokens reached the end of the model: remember them (penalties), and score them
        when the request asked for prompt log-probabilities. `h` is the last layer's output,
        [rows, tokens, hidden], for a prefill chunk; None for a sampled step."""
        for request, tokens in zip(requests, rows.tokens, strict=True):
            sampler = tail_state(request).sampler
            sampler.observe(list(tokens))
            if sampler.scorer is not None and h is not None:
                sampler.scorer.add_chunk(list(tokens), h, self.stage.logits)
            elif sampler.scorer is not None:
                sampler.scorer.add_last(tokens[-1])

    def finish(self, step: Step, rows: Rows, requests: list[ActiveRequest],
               h: mx.array) -> TailOutput:
        """A decode step reached the end of the model: sample every row.

        `h` is the last layer's output, [rows, tokens, hidden] in the model's dtype; `rows`
        and `requests` are the rows still live, in `h`'s order.
        """
        self.observe(rows, requests)
        logits = self.stage.logits(h)
        states = [tail_state(request) for request in requests]
        drawn = [state.sampler.sample(logits[i:i + 1]) for i, state in enumerate(states)]
        mx.eval([token for token, _ in drawn])
        out = TailOutput()
        continuing: list[str] = []
        for i, (request, state, (token, logprobs)) in enumerate(
                zip(requests, states, drawn, strict=True)):
            sample = state.sampler.describe(token, logprobs)
            index = state.generated
            state.generated += 1
            finish = FinishReason.NONE
            if sample.token in state.eos_token_ids or sample.grammar_done:
                finish = FinishReason.STOP
            elif state.generated >= state.max_tokens:
                finish = FinishReason.LENGTH
            else:
                state.next_token = sample.token
                state.next_position = rows.positions[i] + rows.tokens_per_row
                continuing.append(rows.request_ids[i])
            out.tokens.append((request.entry, frames.token(
                rows.request_ids[i], index, sample.token, logprob=sample.logprob,
                top_ids=sample.top_ids, top_logprobs=sample.top_logprobs, finish=finish,
                prompt_logprobs=state.sampler.take_prompt_logprobs())))
        if isinstance(step, TrainStep):
            dispatches = self.scheduler.passed(step.train_id, continuing)
        elif self.scheduler.running(step.request_id):  # a lone request's own train
            dispatches = self.scheduler.passed(step.request_id, continuing)
        else:  # a request's first token: it starts or waits for a train
            dispatches = self.scheduler.ready(step.request_id) if continuing else []
        out.steps = [s for d in dispatches if (s := self._next_step(d, step.epoch)) is not None]
        return out

    def reset(self) -> None:
        """A new ring: no train goes on, and the number of stages is learned again."""
        self.scheduler = TrainScheduler(max_batch=self.scheduler.max_batch,
                                        new_id=self.scheduler.new_id)

    def forget(self, request_id: str) -> list[Step]:
        """The request ended outside a step: the steps of trains that can start now."""
        self.scheduler.forget(request_id)
        steps = []
        for dispatch in self.scheduler.drain_waiting():
            request = self._requests.get(dispatch.members[0])
            if request is not None and (step := self._next_step(dispatch, request.epoch)):
                steps.append(step)
        return steps

    def _next_step(self, dispatch: Dispatch, epoch: int) -> Step | None:
        members = [(m, r) for m in dispatch.members if (r := self._requests.get(m)) is not None]
        if not members:
            return None
        head = members[0][1].head
        if not dispatch.batched:
            request_id, request = members[0]
            state = tail_state(request)
            return RequestStep(request_id, 0, state.next_position, (state.next_token,), None,
                               True, request.entry, head, epoch, None)
        states = [tail_state(r) for _, r in members]
        return TrainStep(dispatch.train_id, 0, tuple(m for m, _ in members),
                         tuple(s.next_position for s in states),
                         tuple(s.next_token for s in states), None, head, epoch)
