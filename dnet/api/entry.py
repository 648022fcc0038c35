"""The entry node: it owns a request, sends it into the ring and collects its tokens.

The prompt goes to the head shard as prefill chunks, then the last prompt token alone with
`sample` set, exactly the steps mlx-lm's generate_step takes. From then on the tail feeds
the head itself; the entry only listens on its token sink and, when the request ends for
any reason, sends a RELEASE that frees the KV caches round the ring.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc

from dnet import __version__
from dnet.proto import dnet_ring_pb2 as pb
from dnet.proto import dnet_ring_pb2_grpc as pb_grpc
from dnet.ring.links import LinkPool, open_frames

log = logging.getLogger(__name__)

PREFILL_CHUNK = 2048  # mlx-lm's prefill_step_size: the same chunks give the same numbers


MAX_REPLAYS = 3
DEFAULT_MAX_REQUESTS = 64


@dataclass(frozen=True)
class Timeouts:
    first_token_s: float = 300.0
    next_token_s: float = 120.0
    replan_s: float = 30.0  # how long a failed request waits for a re-planned ring


class DecodeStats:
    """Recent decode speed seen by this entry: a moving average of the time between tokens."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self.seconds_per_token = 0.0

    def token(self, request_id: str, index: int) -> None:
        now = time.monotonic()
        previous = self._last.get(request_id)
        self._last[request_id] = now
        if previous is not None and index > 0:
            gap = now - previous
            self.seconds_per_token = (gap if not self.seconds_per_token
                                      else 0.8 * self.seconds_per_token + 0.2 * gap)

    def done(self, request_id: str) -> None:
        self._last.pop(request_id, None)

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.seconds_per_token if self.seconds_per_token else 0.0


class RingError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class RingEntry:
    def __init__(self, head: str, *, timeouts: Timeouts | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, epoch: int = 0) -> None:
        self.head = head
        self.epoch = epoch
        self.recover = False  # replay failed requests on a re-planned ring (mesh mode)
        self.max_requests = DEFAULT_MAX_REQUESTS
        self._active = 0
        self.address = ""  # our token sink, host:port; set once its server listens
        self.timeouts = timeouts or Timeouts()
        self.prefill_chunk = prefill_chunk
        self._pending: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[pb.Token],
                                       str]] = {}
        self._links = LinkPool(open_frames, self._on_rejected, self._on_broken)
        # Closed while the mesh re-plans: new requests wait, so none starts on a half-built
        # ring. Manual mode never closes it.
        self._admitting = threading.Event()
        self._admitting.set()
        self.admission_timeout_s = 60.0
        self.stats = DecodeStats()

    def close(self) -> None:
        self._links.close()

    # ----- plan changes (mesh mode) ---------------------------------------------------

    def pause(self) -> None:
        self._admitting.clear()

    def resume(self, head: str, epoch: int) -> None:
        self.head, self.epoch = head, epoch
        self._admitting.set()

    def drain(self, timeout_s: float) -> int:
        """Wait for the requests in flight to end; fail those left after `timeout_s`.

        Returns how many were failed. Call from a thread, never the event loop.
        """
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.05)
        left = list(self._pending)
        for request_id in left:
            self._fail(request_id, 503, "the mesh is re-planning; please retry")
        return len(left)

    def shut_down(self, timeout_s: float, message: str) -> int:
        """Stop for good: admit nothing more, let the requests in flight end for up to
        `timeout_s`, then fail the rest with `message` (a 503, never replayed). Returns how
        many were failed. Call from a thread, never the event loop."""
        self.recover = False
        self.pause()
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.05)
        left = list(self._pending)
        for request_id in left:
            self._fail(request_id, 503, message)
        return len(left)

    async def _admitted(self) -> None:
        deadline = time.monotonic() + self.admission_timeout_s
        while not self._admitting.is_set():
            if time.monotonic() > deadline:
                raise RingError(503, "the mesh is re-planning; please retry")
            await asyncio.sleep(0.05)

    @property
    def active_requests(self) -> int:
        return self._active

    async def generate(self, prompt: list[int], sampling: pb.SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[pb.Token]:
        """Tokens of one completion, in order; raises RingError when the ring fails it.

        With `recover` set (mesh mode), a request the ring fails mid-answer waits for the
        re-planned ring and is replayed on it: its prompt and the tokens generated so far run
        through the same steps as before, rebuilding the KV caches bit for bit (as Petals
        replays its history), then it carries on. No token is emitted twice.
        """
        if not self.address:
            raise RingError(503, "the token sink is not listening yet")
        if self._active >= self.max_requests:
            raise RingError(429, f"this node already serves {self._active} requests "
                                 f"(--max-requests {self.max_requests}); retry shortly")
        self._active += 1
        try:
            async for token in self._generate(prompt, sampling, request_id):
                yield token
        finally:
            self._active -= 1

    async def _generate(self, prompt: list[int], sampling: pb.SamplingParams,
                        request_id: str | None) -> AsyncIterator[pb.Token]:
        generated: list[int] = []
        failures = 0
        while True:
            await self._admitted()
            epoch = self.epoch
            try:
                async for token in self._attempt(prompt, generated, sampling, request_id):
                    token.index = len(generated)
                    generated.append(token.token)
                    yield token
                    if token.finish_reason:
                        return
                return
            except RingError as exc:
                failures += 1
                if not self.recover or exc.status not in (502, 503) or failures > MAX_REPLAYS:
                    raise
                log.warning("request failed after %d token(s) (%s); replaying it on the "
                            "re-planned ring", len(generated), exc.message)
                await self._next_epoch(epoch, exc)
            request_id = None  # a replay is a new request for the shards

    async def _next_epoch(self, failed: int, cause: RingError) -> None:
        deadline = time.monotonic() + self.timeouts.replan_s
        while self.epoch <= failed or not self._admitting.is_set():
            if time.monotonic() > deadline:
                raise RingError(503, f"{cause.message}; no new ring within "
                                     f"{self.timeouts.replan_s:.0f} s")
            await asyncio.sleep(0.1)

    async def _attempt(self, prompt: list[int], generated: list[int],
                       sampling: pb.SamplingParams,
                       request_id: str | None) -> AsyncIterator[pb.Token]:
        request_id = request_id or uuid.uuid4().hex
        head, epoch = self.head, self.epoch
        tokens: asyncio.Queue[pb.Token] = asyncio.Queue()
        self._pending[request_id] = (asyncio.get_running_loop(), tokens, head)
        params = sampling
        if generated:
            params = pb.SamplingParams()
            params.CopyFrom(sampling)
            params.max_tokens = sampling.max_tokens - len(generated)
            params.draws_done = len(generated)
        try:
            for frame in self._prompt_frames(request_id, head, prompt, params, generated):
                frame.epoch = epoch
                self._links.send(head, frame)
            expected = 0
            timeout = self.timeouts.first_token_s
            while True:
                try:
                    token = await asyncio.wait_for(tokens.get(), timeout)
                except TimeoutError:
                    raise RingError(504, f"no token from the ring within {timeout:.0f} s") from None
                if token.error:
                    raise RingError(token.error_code or 503, token.error)
                if token.index < expected:
                    continue  # a duplicate can only be stale; never emit a token twice
                expected = token.index + 1
                timeout = self.timeouts.next_token_s
                self.stats.token(request_id, token.index)
                yield token
                if token.finish_reason:
                    return
        finally:
            self._pending.pop(request_id, None)
            self.stats.done(request_id)
            try:
                self._links.send(head, pb.Frame(request_id=request_id, kind=pb.RELEASE,
                                                next_layer=0, head=head, epoch=epoch))
            except ConnectionError as exc:
                log.debug("could not release %s: %s", request_id, exc)

    def _prompt_frames(self, request_id: str, head: str, prompt: list[int],
                       sampling: pb.SamplingParams,
                       generated: list[int] = ()) -> Iterator[pb.Frame]:
        # All but the last prompt token fill the KV caches in chunks; the last one runs alone
        # and is sampled, as in mlx-lm's generate_step. A replay then feeds each generated
        # token alone, as the decode steps did, and samples after the last one.
        prefix = prompt[:-1]
        steps = [prefix[i:i + self.prefill_chunk]
                 for i in range(0, len(prefix), self.prefill_chunk)]
        steps += [[token] for token in [prompt[-1], *generated]]
        position = 0
        for i, chunk in enumerate(steps):
            frame = pb.Frame(request_id=request_id, next_layer=0, position=position,
                             tokens=chunk, sample=i == len(steps) - 1, entry=self.address,
                             head=head)
            if position == 0:
                frame.sampling.CopyFrom(sampling)
            position += len(chunk)
            yield frame

    # ----- callbacks from gRPC threads ------------------------------------------------

    def deliver(self, token: pb.Token) -> None:
        pending = self._pending.get(token.request_id)
        if pending is not None:
            loop, queue, _ = pending
            loop.call_soon_threadsafe(queue.put_nowait, token)

    def _fail(self, request_id: str, status: int, message: str) -> None:
        self.deliver(pb.Token(request_id=request_id, error=message, error_code=status))

    def _on_rejected(self, status: pb.FrameStatus) -> None:
        self._fail(status.request_id, 502, f"the head shard rejected the request: "
                                           f"{status.message}")

    def _on_broken(self, address: str, _unsent: list, reason: str) -> None:
        for request_id, (_, _, head) in list(self._pending.items()):
            if head == address:
                self._fail(request_id, 503, f"ring head {address} is unreachable ({reason})")


class EntryService(pb_grpc.RingServicer):
    """The entry's side of the Ring service: the tail's token stream, and health checks."""

    def __init__(self, entry: RingEntry, model_name: str) -> None:
        self.entry = entry
        self.model_name = model_name

    def Tokens(self, request_iterator: Iterator[pb.Token],
               context: grpc.ServicerContext) -> Iterator[pb.Empty]:
        for token in request_iterator:
            self.entry.deliver(token)
        return iter(())

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        return pb.HealthReply(role="api", model=self.model_name, version=__version__,
                              active_requests=self.entry.active_requests)


def local_address_towards(host: str) -> str:
    """The address of this machine on the route to `host` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((socket.gethostbyname(host), 9))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"
