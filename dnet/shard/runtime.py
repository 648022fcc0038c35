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
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import grpc
import mlx.core as mx
import psutil

from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring import codec
from dnet.ring.links import LinkPool, open_frames, open_tokens
from dnet.sampling import TokenSampler, grammar_tokenizer
from dnet.shard.frames import FrameRejected, RequestIds, Rows, check_frame, rows_of
from dnet.shard.groups import GroupCaches
from dnet.shard.router import RouteError, Router
from dnet.shard.tail import Tail, TailState
from dnet.stage import Cache, Stage

log = logging.getLogger(__name__)

DEFAULT_KV_TTL_S = 300.0
TOMBSTONE_TTL_S = 600.0

__all__ = ["FrameRejected", "ShardRuntime"]


@dataclass
class ActiveRequest:
    # This request's own KV caches; None once they moved into a train's batch caches.
    caches: dict[int, Cache] | None
    entry: str
    head: str
    epoch: int
    sampler: TokenSampler | None  # only on the tail
    max_tokens: int
    eos_token_ids: frozenset[int]
    positions: dict[int, int] = field(default_factory=dict)  # run start -> next KV position
    tail: TailState = field(default_factory=TailState)
    last_used: float = field(default_factory=time.monotonic)
    sent_to: set[str] = field(default_factory=set)


@dataclass
class _Control:
    """Work for the compute thread that is not a frame."""

    kind: str  # "link_broken", "entry_gone", "rejected", "retarget" or "tick"
    address: str = ""
    reason: str = ""
    request_id: str = ""
    code: int = 0  # a grpc.StatusCode value, for rejections


class ShardRuntime:
    def __init__(self, load_stage: Callable[[], Stage], router: Router, *, model_name: str,
                 kv_ttl_s: float = DEFAULT_KV_TTL_S, epoch: int = 0,
                 kv_cap_bytes: int | None = None) -> None:
        self._load_stage = load_stage
        self.stage: Stage  # set by the compute thread in start()
        self.router = router
        self.epoch = epoch  # frames of other plan epochs are refused: no mixing of rings
        self.model_name = model_name
        self.kv_ttl_s = kv_ttl_s
        # KV memory the requests may reserve here (prompt + answer, worst case); past it a
        # new request gets a clear 503 rather than the process an out-of-memory kill.
        self.kv_cap_bytes = kv_cap_bytes
        self._kv_reserved: dict[str, int] = {}
        self.vocab_size = 0
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._inbox: queue.SimpleQueue[pb.Frame | _Control | None] = queue.SimpleQueue()
        self._requests: dict[str, ActiveRequest] = {}
        self._ids = RequestIds(TOMBSTONE_TTL_S)
        self._groups = GroupCaches()
        self._tail: Tail | None = None
        self._identity = uuid.uuid4().hex[:12]  # counted by the tail to learn the stages
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
        check_frame(frame, epoch=self.epoch, holds=self.stage.holds(frame.next_layer),
                    layers=self.stage.layers, vocab_size=self.vocab_size,
                    hidden_size=self.stage.hidden_size)
        if frame.kind == pb.RELEASE:
            self._inbox.put(frame)
            return
        if self._ids.admit(frame):
            self._inbox.put(frame)

    def release(self, request_id: str, propagate: bool, head: str = "") -> None:
        self._inbox.put(pb.Frame(request_id=request_id, kind=pb.RELEASE,
                                 next_layer=self.stage.layers[0] if propagate else -1,
                                 head=head, epoch=self.epoch))

    # ----- link callbacks (link threads) -> compute thread -----------------------------

    def _on_frame_status(self, status: pb.FrameStatus) -> None:
        self._inbox.put(_Control("rejected", request_id=status.request_id,
                                 reason=status.message, code=status.code))

    def _on_frames_broken(self, address: str, _unsent: list, reason: str) -> None:
        self._inbox.put(_Control("link_broken", address=address, reason=reason))

    def _on_entry_gone(self, address: str, _unsent: list, reason: str) -> None:
        self._inbox.put(_Control("entry_gone", address=address, reason=reason))

    # ----- the compute thread ----------------------------------------------------------

    def _run(self) -> None:
        try:
            self.stage = self._load_stage()
            self.vocab_size = int(self.stage.config["vocab_size"])
            if self.kv_cap_bytes is None:
                self.kv_cap_bytes = psutil.virtual_memory().available // 2
            if self.stage.holds_head:
                self._tail = Tail(self.stage, self._requests.get, self._send_step,
                                  self._tokens_out.send)
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
                request_ids = list(getattr(item, "batch", [])) or [
                    getattr(item, "request_id", "")]
                log.exception("request %s failed on this shard", ", ".join(request_ids))
                for request_id in request_ids:
                    self._fail(request_id, 500, f"shard error: {exc}")
            if time.monotonic() >= next_sweep:
                self._sweep()
                next_sweep = time.monotonic() + 1.0

    def _handle_activation(self, frame: pb.Frame) -> None:
        rows = rows_of(frame)
        if not frame.batch and frame.request_id not in self._requests and frame.position == 0:
            if not self._reserve_kv(frame):
                return
            self._open(frame)
        live = [i for i, r in enumerate(rows.request_ids) if r in self._requests]
        if not live:
            return  # released while this frame was queued
        rows = rows.select(live) if len(live) < len(rows.request_ids) else rows
        requests = [self._requests[r] for r in rows.request_ids]
        start = frame.next_layer
        for request, position in zip(requests, rows.positions, strict=True):
            expected = request.positions.get(start, 0)
            if position != expected:
                raise RuntimeError(f"frame at position {position} but layer {start} expects "
                                   f"{expected}")
            request.last_used = time.monotonic()
        if frame.batch:
            own = {r: req.caches for r, req in zip(rows.request_ids, requests, strict=True)
                   if req.caches is not None}
            caches = self._groups.caches_for(frame.request_id, rows.request_ids, own)
            for request in requests:
                request.caches = None  # now rows of the train's batch caches
        else:
            caches = requests[0].caches
        if start == 0:
            h = self.stage.embed(mx.array(rows.tokens, dtype=mx.uint32))
        else:
            h = codec.decode(frame.hidden)
            if len(live) < len(frame.batch):
                h = h[mx.array(live)]
        h, end = self.stage.forward(h, start, caches)
        for request, position in zip(requests, rows.positions, strict=True):
            request.positions[start] = position + rows.tokens_per_row
        if end < self.stage.num_layers:
            mx.eval(h)
            self._forward(frame, rows, requests, end, h)
        elif self._tail is not None:
            if frame.position == 0 and not frame.batch:
                self._tail.count_stages(list(frame.route), self._identity)
            if frame.sample:
                self._tail.finish(frame, rows, requests, h)
            else:
                # A prompt chunk needs only the KV caches, as in mlx-lm's prefill: the last
                # layer's attention output and MLP are never computed.
                self._tail.observe(rows, requests, h)
                mx.eval([cache.state for cache in caches.values()])

    def _reserve_kv(self, frame: pb.Frame) -> bool:
        need = self.stage.kv_bytes(frame.sampling.max_context)
        reserved = sum(self._kv_reserved.values())
        if self.kv_cap_bytes and reserved + need > self.kv_cap_bytes:
            log.warning("refused %s: its KV cache (%d bytes) would pass the cap (%d of %d "
                        "bytes reserved)", frame.request_id, need, reserved, self.kv_cap_bytes)
            self._ids.release(frame.request_id)
            if frame.entry:
                self._tokens_out.send(frame.entry, pb.Token(
                    request_id=frame.request_id, error_code=503,
                    error=f"KV cache full on a shard: this request needs {need} bytes, "
                          f"{self.kv_cap_bytes - reserved} of {self.kv_cap_bytes} are free; "
                          "retry later or ask for fewer tokens"))
            return False
        self._kv_reserved[frame.request_id] = need
        return True

    @property
    def kv_reserved_bytes(self) -> int:
        return sum(self._kv_reserved.values())

    def _open(self, frame: pb.Frame) -> ActiveRequest:
        sampling = frame.sampling
        request = ActiveRequest(
            caches=self.stage.new_caches(),
            entry=frame.entry,
            head=frame.head,
            epoch=frame.epoch,
            sampler=TokenSampler(sampling, self.vocab_size, partial(
                grammar_tokenizer, self.stage.model_dir, self.vocab_size))
            if self.stage.holds_head else None,
            max_tokens=sampling.max_tokens,
            eos_token_ids=frozenset(sampling.eos_token_ids),
        )
        self._requests[frame.request_id] = request
        return request

    def _forward(self, frame: pb.Frame, rows: Rows, requests: list[ActiveRequest],
                 next_layer: int, h: mx.array) -> None:
        try:
            address = self.router.address_for(next_layer, frame)
        except RouteError as exc:
            for request_id in rows.request_ids:
                self._fail(request_id, 503, str(exc))
            return
        out = pb.Frame(request_id=frame.request_id, next_layer=next_layer,
                       position=frame.position, tokens=[t for row in rows.tokens for t in row],
                       hidden=codec.encode(h), sample=frame.sample, entry=frame.entry,
                       head=frame.head, epoch=frame.epoch)
        if frame.batch:
            out.batch.extend(rows.request_ids)
            out.batch_positions.extend(rows.positions)
        elif frame.position == 0:
            out.sampling.CopyFrom(frame.sampling)
            out.route.extend([*frame.route, self._identity])
        for request in requests:
            request.sent_to.add(address)
        self._frames_out.send(address, out)

    def _send_step(self, address: str, frame: pb.Frame) -> None:
        """The tail's next decode step: into this shard's inbox, or to the head shard."""
        if not address:
            self._inbox.put(frame)
            return
        for request_id in frame.batch or [frame.request_id]:
            request = self._requests.get(request_id)
            if request is not None:
                request.sent_to.add(address)
        self._frames_out.send(address, frame)

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
        self._kv_reserved.pop(request_id, None)
        request = self._requests.pop(request_id, None)
        if request is not None and request.caches is None:
            self._groups.member_left(request_id)
        if self._tail is not None:
            self._tail.forget(request_id)
        self._ids.release(request_id)

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
            if self._tail is not None:
                self._tail.scheduler.max_trains = 1  # relearned from the new ring's frames
        elif control.kind == "rejected":
            # A next shard on another plan epoch, or restarted, is a ring to re-plan (503, which
            # the entry can replay); anything else is a bug worth a 500.
            retryable = {grpc.StatusCode.FAILED_PRECONDITION.value[0],
                         grpc.StatusCode.NOT_FOUND.value[0]}
            status = 503 if control.code in retryable else 500
            group = self._groups.groups.get(control.request_id)
            for request_id in group.members if group else [control.request_id]:
                self._fail(request_id, status, f"next shard rejected a frame: {control.reason}")
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
        self._ids.prune()
