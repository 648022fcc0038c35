"""The entry node: it owns a request, sends it into the ring and collects its tokens.

The prompt goes to the head shard as prefill chunks, then the last prompt token alone with
`sample` set, exactly the steps mlx-lm's generate_step takes (`decisions.prompt_steps`).
A prompt with at least one full chunk is first looked up round the ring: every shard says
how many of its leading blocks it can restore from its prefix cache and pins them, and the
request opens past the least of them, on every shard alike (`dnet/prefix/`).
From then on the tail feeds the head itself; the entry only listens on its token sink and,
when the request ends for any reason, sends a release that frees the KV caches round the
ring. In mesh mode (`recover`), a request the ring fails is replayed on the re-planned ring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from functools import partial

from dnet.entry import decisions
from dnet.entry.decisions import DEFAULT_MAX_REQUESTS, PREFILL_CHUNK, REPLANNING, RingView
from dnet.entry.inflight import Inflight, RingGate, within
from dnet.prefix.index import block_keys, namespace_for
from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring import frames
from dnet.ring.frames import Lookup, Release
from dnet.ring.links import TCP, LinkPool, StreamMethod, Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timeouts:
    first_token_s: float = 300.0
    next_token_s: float = 120.0
    replan_s: float = 30.0  # how long a failed request waits for a re-planned ring
    admission_s: float = 60.0  # how long a new request waits while the mesh re-plans


class RingError(Exception):
    """The ring could not serve a request; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class DecodeStats:
    """Recent decode speed seen by this entry: a moving average of the time between tokens."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self.seconds_per_token = 0.0

    def token(self, request_id: str, index: int, now: float) -> None:
        previous = self._last.get(request_id)
        self._last[request_id] = now
        if previous is not None and index > 0:
            self.seconds_per_token = decisions.next_moving_average(self.seconds_per_token,
                                                                   now - previous)

    def done(self, request_id: str) -> None:
        self._last.pop(request_id, None)

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.seconds_per_token if self.seconds_per_token else 0.0


class RingEntry:
    """Requests into the ring and their tokens back, for one node.

    `address` is this entry's token sink (host:port), where tails send tokens; `head` and
    `epoch` the ring to start with, `admitting` false to hold new requests until `resume`.
    `inflight` is shared with the token sink's service when that must exist first.
    """

    def __init__(self, head: str, *, address: str, epoch: int = 0, admitting: bool = True,
                 recover: bool = False, max_requests: int = DEFAULT_MAX_REQUESTS,
                 timeouts: Timeouts | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 transport: Transport = TCP, inflight: Inflight | None = None) -> None:
        self._address = address
        self._recover = recover
        self._max_requests = max_requests
        self._timeouts = timeouts or Timeouts()
        self._prefill_chunk = prefill_chunk
        self._gate = RingGate(RingView(head, epoch, admitting))
        self._inflight = inflight or Inflight()
        self._links = LinkPool(StreamMethod.FRAMES, self._on_rejected, self._on_broken, transport)
        self.stats = DecodeStats()

    @property
    def address(self) -> str:
        return self._address

    def readdress(self, address: str) -> None:
        """This node's token sink is now reached at `address` (host:port), e.g. after its
        primary interface changed; requests from now on name it."""
        self._address = address

    @property
    def head(self) -> str:
        return self._gate.view.head

    @property
    def epoch(self) -> int:
        return self._gate.view.epoch

    @property
    def active_requests(self) -> int:
        return self._inflight.requests

    def close(self) -> None:
        self._links.close()

    # ----- plan changes (mesh mode; any thread) -------------------------------------------

    def pause(self) -> None:
        """Hold new requests (they wait, up to Timeouts.admission_s) until `resume`."""
        view = self._gate.view
        self._gate.set(RingView(view.head, view.epoch, admitting=False))

    def resume(self, head: str, epoch: int) -> None:
        """Send requests to the ring of plan `epoch`, whose head shard is `head`."""
        self._gate.set(RingView(head, epoch, admitting=True))

    def drain(self, timeout_s: float) -> int:
        """Wait for the requests in flight to end; fail those left after `timeout_s`.

        Returns how many were failed. Blocks: call from a thread, never the event loop.
        """
        left = self._inflight.wait_idle(timeout_s)
        for request_id in left:
            self._inflight.fail(request_id, 503, REPLANNING)
        return len(left)

    def shut_down(self, timeout_s: float, message: str) -> int:
        """Stop for good: admit nothing more, let the requests in flight end for up to
        `timeout_s`, then fail the rest with `message` (a 503, never replayed). Returns how
        many were failed. Blocks: call from a thread, never the event loop."""
        self._recover = False
        self.pause()
        left = self._inflight.wait_idle(timeout_s)
        for request_id in left:
            self._inflight.fail(request_id, 503, message)
        return len(left)

    # ----- requests (the event loop) ------------------------------------------------------

    async def generate(self, prompt: list[int], sampling: pb.SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[pb.Token]:
        """Tokens of one completion, in order; raises RingError when the ring fails it.

        With `recover` set (mesh mode), a request the ring fails mid-answer waits for the
        re-planned ring and is replayed on it: its prompt and the tokens generated so far run
        through the same steps as before, rebuilding the KV caches bit for bit (as Petals
        replays its history), then it carries on. No token is emitted twice.
        """
        refusal = self._inflight.enter(self._max_requests, listening=bool(self._address))
        if refusal is not None:
            raise RingError(refusal.status, refusal.message)
        try:
            # aclosing: a client that goes away closes this generator, and the request's
            # Release must go out then, not whenever the inner generators are collected.
            async with contextlib.aclosing(self._generate(prompt, sampling, request_id)) as tokens:
                async for token in tokens:
                    yield token
        finally:
            self._inflight.leave()

    async def _generate(self, prompt: list[int], sampling: pb.SamplingParams,
                        request_id: str | None) -> AsyncGenerator[pb.Token, None]:
        generated: list[int] = []
        failures = 0
        failed: tuple[int, RingError] | None = None  # the epoch that failed, and how
        while True:
            view = await self._ring(failed)
            try:
                async with contextlib.aclosing(self._attempt(
                        view, prompt, generated, sampling,
                        request_id or uuid.uuid4().hex)) as tokens:
                    async for token in tokens:
                        token.index = len(generated)
                        generated.append(token.token)
                        yield token
                        if token.finish_reason:
                            return
                return
            except RingError as exc:
                failures += 1
                if not decisions.should_replay(self._recover, exc.status, failures):
                    raise
                log.warning("request failed after %d token(s) (%s); replaying it on the "
                            "re-planned ring", len(generated), exc.message)
                failed = (view.epoch, exc)
            request_id = None  # a replay is a new request for the shards

    async def _ring(self, failed: tuple[int, RingError] | None) -> RingView:
        """The ring to run on: the current one once it admits, or after a failure a newer
        one; raises RingError (503) when none comes in time."""
        if failed is None:
            view = await self._gate.wait_for(decisions.admits, self._timeouts.admission_s)
            if view is None:
                raise RingError(503, REPLANNING)
            return view
        epoch, cause = failed
        view = await self._gate.wait_for(partial(decisions.replaces, epoch),
                                         self._timeouts.replan_s)
        if view is None:
            raise RingError(503, f"{cause.message}; no new ring within "
                                 f"{self._timeouts.replan_s:.0f} s")
        return view

    async def _attempt(self, view: RingView, prompt: list[int], generated: list[int],
                       sampling: pb.SamplingParams,
                       request_id: str) -> AsyncGenerator[pb.Token, None]:
        tokens = self._inflight.open(request_id, view.head)
        try:
            chunk = self._prefill_chunk
            keys = block_keys(prompt, chunk, namespace_for(chunk))
            reused = 0
            if keys and decisions.may_reuse_prefix(sampling):
                reused = await self._look_up(view, request_id, keys, tokens)
            for step in decisions.prompt_steps(
                    request_id, prompt, generated,
                    decisions.replay_sampling(sampling, len(generated)), entry=self._address,
                    view=view, chunk=chunk, keys=keys, reused=reused):
                self._links.send(view.head, frames.to_wire(step))
            expected = 0
            timeout = self._timeouts.first_token_s
            while True:
                try:
                    token = await within(tokens.get(), timeout)
                except TimeoutError:
                    raise RingError(504, f"no token from the ring within {timeout:.0f} s"
                                    ) from None
                verdict = decisions.judge(token, expected)
                if verdict is decisions.Verdict.FAIL:
                    raise RingError(decisions.failure_status(token), token.error)
                if verdict is decisions.Verdict.SKIP:
                    continue
                if not expected:
                    token.cached_tokens = reused * chunk
                expected = token.index + 1
                timeout = self._timeouts.next_token_s
                self.stats.token(request_id, token.index, time.monotonic())
                yield token
                if token.finish_reason:
                    return
        finally:
            self._inflight.close(request_id)
            self.stats.done(request_id)
            try:
                self._links.send(view.head, frames.to_wire(
                    Release(request_id, 0, view.head, view.epoch)))
            except ConnectionError as exc:
                log.debug("could not release %s: %s", request_id, exc)

    async def _look_up(self, view: RingView, request_id: str, keys: list[bytes],
                       tokens: asyncio.Queue[pb.Token]) -> int:
        """How many leading blocks of `keys` every shard restores for `request_id` (pinned
        until the request opens or is released); raises RingError if the ring fails."""
        self._links.send(view.head, frames.to_wire(Lookup(
            request_id, 0, tuple(keys), len(keys), self._address, view.head, view.epoch)))
        timeout = self._timeouts.first_token_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                token = await within(tokens.get(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise RingError(504, f"no answer to the prefix-cache lookup within "
                                     f"{timeout:.0f} s") from None
            if token.error:
                raise RingError(decisions.failure_status(token), token.error)
            if token.lookup:
                return min(token.reused_blocks, len(keys))

    # ----- from gRPC and link threads -------------------------------------------------------

    def deliver(self, token: pb.Token) -> None:
        """A token (or a failure) from the ring for one of this entry's requests."""
        self._inflight.deliver(token)

    def _on_rejected(self, status: pb.FrameStatus) -> None:
        self._inflight.fail(status.request_id, 502,
                            f"the head shard rejected the request: {status.message}")

    def _on_broken(self, address: str, reason: str) -> None:
        self._inflight.fail_sent_to(address, 503,
                                    f"ring head {address} is unreachable ({reason})")
