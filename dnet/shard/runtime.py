"""A shard at work: frames in, layers run, frames or tokens out.

One compute thread loads the model and owns it and every request's KV cache: MLX arrays
belong to the thread that makes them, and no lock need guard the caches. gRPC threads only
validate and queue frames; links send in the background. A request's path round the ring:

    entry --tokens--> head [embed, run] --hidden--> ... --hidden--> tail [run, norm, head, sample]
    tail --token--> entry (to stream to the client)
    tail --token--> head  (the next decode step; the entry is not an extra hop)

The tail samples on its own until the request ends (end-of-sequence token or max_tokens);
the entry stops it early (stop string, client gone) with a RELEASE frame that follows the
request's path and drops its KV cache on every shard.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import mlx.core as mx

from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring import codec
from dnet.ring.links import LinkPool, open_frames, open_tokens
from dnet.sampling import TokenSampler
from dnet.shard.router import RouteError, Router
from dnet.stage import Cache, Stage

log = logging.getLogger(__name__)

DEFAULT_KV_TTL_S = 300.0
TOMBSTONE_TTL_S = 600.0


class FrameRejected(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class ActiveRequest:
    caches: dict[int, Cache]
    entry: str
    head: str
    sampler: TokenSampler | None  # only on the tail
    max_tokens: int
    eos_token_ids: frozenset[int]
    generated: int = 0
    last_used: float = field(default_factory=time.monotonic)
    sent_to: set[str] = field(default_factory=set)


@dataclass
class _Control:
    """Work for the compute thread that is not a frame: link failures and rejections."""

    kind: str  # "link_broken", "entry_gone", "rejected"
    address: str = ""
    reason: str = ""
    request_id: str = ""


class ShardRuntime:
    def __init__(self, load_stage: Callable[[], Stage], router: Router, *, model_name: str,
                 kv_ttl_s: float = DEFAULT_KV_TTL_S, epoch: int = 0) -> None:
        self._load_stage = load_stage
        self.stage: Stage  # set by the compute thread in start()
        self.router = router
        self.epoch = epoch  # frames of other plan epochs are refused: no mixing of rings
        self.model_name = model_name
        self.kv_ttl_s = kv_ttl_s
        self.vocab_size = 0
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._inbox: queue.SimpleQueue[pb.Frame | _Control | None] = queue.SimpleQueue()
        self._requests: dict[str, ActiveRequest] = {}
        # Ids the gRPC threads have seen open, and ids released recently: a frame that
        # overtook its request's release must be dropped, not start a cache that never ends.
        self._known: set[str] = set()
        self._released: dict[str, float] = {}
        self._ids_lock = threading.Lock()
        self._frames_out = LinkPool(open_frames, self._on_frame_status, self._on_frames_broken)
        self._tokens_out = LinkPool(open_tokens, lambda _reply: None, self._on_entry_gone)
        self._thread = threading.Thread(target=self._run, name="compute", daemon=True)
        self._stopping = False

    # ----- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Load the stage on the compute thread and start serving; raises if loading fails."""
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout=5)
        if self._loaded.is_set() and self._load_error is None:
            self.stage.close()
        self._frames_out.close()
        self._tokens_out.close()

    @property
    def active_requests(self) -> int:
        return len(self._requests)

    @property
    def ready(self) -> bool:
        return self._loaded.is_set() and self._load_error is None

    def retarget(self, router: Router, epoch: int) -> None:
        """Serve a new plan epoch with the same layers: keep the weights, drop the requests."""
        self._inbox.put(_Control("retarget", reason=str(epoch)))
        self.router = router
        self.epoch = epoch

    # ----- called from gRPC threads ----------------------------------------------------

    def accept(self, frame: pb.Frame) -> None:
        """Validate a frame and queue it for the compute thread; raises FrameRejected."""
        if not frame.request_id:
            raise FrameRejected(grpc.StatusCode.INVALID_ARGUMENT, "frame has no request_id")
        if frame.epoch != self.epoch:
            raise FrameRejected(grpc.StatusCode.FAILED_PRECONDITION,
                                f"frame of plan epoch {frame.epoch}; this shard serves "
                                f"epoch {self.epoch}")
        if frame.kind == pb.RELEASE:
            self._inbox.put(frame)
            return
        if not self.stage.holds(frame.next_layer):
            raise FrameRejected(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this shard does not hold layer {frame.next_layer} "
                f"(it holds {self.stage.layers})",
            )
        if not frame.tokens:
            raise FrameRejected(grpc.StatusCode.INVALID_ARGUMENT, "frame carries no tokens")
        if frame.next_layer == 0:
            bad = [t for t in frame.tokens if not 0 <= t < self.vocab_size]
            if bad:
                raise FrameRejected(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"token ids out of range 0..{self.vocab_size - 1}: {bad[:5]}")
        else:
            try:
                codec.check(frame.hidden, self.stage.hidden_size)
            except codec.TensorError as exc:
                raise FrameRejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
            if frame.hidden.shape[1] != len(frame.tokens):
                raise FrameRejected(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{frame.hidden.shape[1]} hidden rows for "
                                    f"{len(frame.tokens)} tokens")
        with self._ids_lock:
            if frame.request_id in self._released:
                return  # a late frame of a finished request
            if frame.position == 0:
                # Opens the request, or starts a later round of it on a multi-round ring.
                self._known.add(frame.request_id)
            elif frame.request_id not in self._known:
                raise FrameRejected(grpc.StatusCode.NOT_FOUND,
                                    f"unknown request {frame.request_id}")
        self._inbox.put(frame)

    def release(self, request_id: str, propagate: bool, head: str = "") -> None:
        self._inbox.put(pb.Frame(request_id=request_id, kind=pb.RELEASE,
                                 next_layer=self.stage.layers[0] if propagate else -1,
                                 head=head, epoch=self.epoch))

    # ----- link callbacks (link threads) -> compute thread -----------------------------

    def _on_frame_status(self, status: pb.FrameStatus) -> None:
        self._inbox.put(_Control("rejected", request_id=status.request_id,
                                 reason=status.message))

    def _on_frames_broken(self, address: str, _unsent: list, reason: str) -> None:
        self._inbox.put(_Control("link_broken", address=address, reason=reason))

    def _on_entry_gone(self, address: str, _unsent: list, reason: str) -> None:
        self._inbox.put(_Control("entry_gone", address=address, reason=reason))

    # ----- the compute thread ----------------------------------------------------------

    def _run(self) -> None:
        try:
            self.stage = self._load_stage()
            self.vocab_size = int(self.stage.config["vocab_size"])
        except BaseException as exc:  # handed to start(), which raises it in the caller
            self._load_error = exc
            return
        finally:
            self._loaded.set()
        next_sweep = time.monotonic() + 1.0
        while True:
            try:
                item = self._inbox.get(timeout=1.0)
            except queue.Empty:
                item = _Control("tick")
            if item is None or self._stopping:
                return
            try:
                if isinstance(item, _Control):
                    self._handle_control(item)
                elif item.kind == pb.RELEASE:
                    self._handle_release(item)
                else:
                    self._handle_activation(item)
            except Exception as exc:  # one request's failure must not stop the shard
                request_id = getattr(item, "request_id", "")
                log.exception("request %s failed on this shard", request_id)
                self._fail(request_id, 500, f"shard error: {exc}")
            if time.monotonic() >= next_sweep:
                self._sweep()
                next_sweep = time.monotonic() + 1.0

    def _handle_activation(self, frame: pb.Frame) -> None:
        request = self._requests.get(frame.request_id)
        if request is None:
            if frame.position != 0:
                return  # released while this frame was queued
            request = self._open(frame)
        request.last_used = time.monotonic()
        start = frame.next_layer
        offset = request.caches[start].offset
        if offset != frame.position:
            raise RuntimeError(f"frame at position {frame.position} but the KV cache of "
                               f"layer {start} holds {offset} tokens")
        if start == 0:
            h = self.stage.embed(mx.array(list(frame.tokens), dtype=mx.uint32)[None])
        else:
            h = codec.decode(frame.hidden)
        h, end = self.stage.forward(h, start, request.caches)
        if end < self.stage.num_layers:
            mx.eval(h)
            self._forward(request, frame, end, h)
        elif request.sampler is not None:
            request.sampler.observe(list(frame.tokens))
            if frame.sample:
                self._sample(frame.request_id, request, h, frame)
            else:
                mx.eval(h)  # a prefill chunk: materialise the KV caches, nothing to emit

    def _open(self, frame: pb.Frame) -> ActiveRequest:
        is_tail = self.stage.holds_head
        sampling = frame.sampling
        request = ActiveRequest(
            caches=self.stage.new_caches(),
            entry=frame.entry,
            head=frame.head,
            sampler=TokenSampler(sampling, self.vocab_size) if is_tail else None,
            max_tokens=sampling.max_tokens,
            eos_token_ids=frozenset(sampling.eos_token_ids),
        )
        self._requests[frame.request_id] = request
        return request

    def _forward(self, request: ActiveRequest, frame: pb.Frame, next_layer: int,
                 h: mx.array) -> None:
        try:
            address = self.router.address_for(next_layer, frame)
        except RouteError as exc:
            self._fail(frame.request_id, 503, str(exc))
            return
        out = pb.Frame(
            request_id=frame.request_id,
            next_layer=next_layer,
            position=frame.position,
            tokens=frame.tokens,
            hidden=codec.encode(h),
            sample=frame.sample,
            entry=frame.entry,
            head=frame.head,
            epoch=frame.epoch,
        )
        if frame.position == 0:
            out.sampling.CopyFrom(frame.sampling)
        request.sent_to.add(address)
        self._frames_out.send(address, out)

    def _sample(self, request_id: str, request: ActiveRequest, h: mx.array,
                frame: pb.Frame) -> None:
        assert request.sampler is not None
        token, logprobs = request.sampler.sample(self.stage.logits(h))
        sample = request.sampler.describe(token, logprobs)
        index = request.generated
        request.generated += 1
        finish = ""
        if sample.token in request.eos_token_ids:
            finish = "stop"
        elif request.generated >= request.max_tokens:
            finish = "length"
        self._tokens_out.send(request.entry, pb.Token(
            request_id=request_id, index=index, token=sample.token, logprob=sample.logprob,
            top_ids=sample.top_ids, top_logprobs=sample.top_logprobs, finish_reason=finish,
        ))
        if finish:
            return
        next_step = pb.Frame(
            request_id=request_id, next_layer=0, position=frame.position + len(frame.tokens),
            tokens=[sample.token], sample=True, entry=request.entry, head=request.head,
            epoch=frame.epoch,
        )
        if self.stage.holds_embedding:
            self._inbox.put(next_step)
        else:
            request.sent_to.add(request.head)
            self._frames_out.send(request.head, next_step)

    def _handle_release(self, frame: pb.Frame) -> None:
        self._drop(frame.request_id)
        start = frame.next_layer
        if start < 0 or not self.stage.holds(start):
            return
        end = self.stage.run_end(start)
        if end >= self.stage.num_layers:
            return
        try:
            address = self.router.address_for(end, frame)
        except RouteError as exc:
            log.warning("cannot pass on the release of %s: %s", frame.request_id, exc)
            return
        self._frames_out.send(address, pb.Frame(request_id=frame.request_id, kind=pb.RELEASE,
                                                next_layer=end, head=frame.head,
                                                epoch=frame.epoch))

    def _release_everywhere(self, request_id: str, head: str) -> None:
        release = pb.Frame(request_id=request_id, kind=pb.RELEASE, next_layer=0, head=head,
                           epoch=self.epoch)
        if self.stage.holds_embedding:
            self._handle_release(release)
        else:
            self._drop(request_id)
            self._frames_out.send(head, release)

    def _drop(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        with self._ids_lock:
            self._known.discard(request_id)
            self._released[request_id] = time.monotonic()

    def _fail(self, request_id: str, code: int, message: str) -> None:
        """Tell the request's entry it failed, and drop it here."""
        request = self._requests.get(request_id)
        if request is None:
            return
        self._drop(request_id)
        if request.entry:
            self._tokens_out.send(request.entry, pb.Token(
                request_id=request_id, error=message, error_code=code))

    def _handle_control(self, control: _Control) -> None:
        if control.kind == "retarget":
            for request_id in list(self._requests):
                self._drop(request_id)
        elif control.kind == "rejected":
            self._fail(control.request_id, 500, f"next shard rejected a frame: {control.reason}")
        elif control.kind == "link_broken":
            self.router.forget(control.address)
            for request_id, request in list(self._requests.items()):
                if control.address in request.sent_to:
                    self._fail(request_id, 503,
                               f"ring member {control.address} is unreachable ({control.reason})")
        elif control.kind == "entry_gone":
            for request_id, request in list(self._requests.items()):
                if request.entry == control.address:
                    log.info("entry %s is gone; releasing %s round the ring",
                             control.address, request_id)
                    self._release_everywhere(request_id, request.head)

    def _sweep(self) -> None:
        now = time.monotonic()
        for request_id, request in list(self._requests.items()):
            if now - request.last_used > self.kv_ttl_s:
                log.warning("request %s idle for %.0f s: dropping its KV cache",
                            request_id, now - request.last_used)
                self._drop(request_id)
        with self._ids_lock:
            for request_id, when in list(self._released.items()):
                if now - when > TOMBSTONE_TTL_S:
                    del self._released[request_id]
