"""A shard at work: frames in, layers run, frames or tokens out.

One compute thread loads the model and owns it and every request's KV cache: MLX arrays
belong to the thread that makes them, and no lock need guard the caches. gRPC threads only
parse frames (`dnet.ring.frames.parse`) and queue their typed messages; links send in the
background and report their events as control messages (`dnet.shard.inbox`). A request's
path round the ring:

    entry --tokens--> head [embed, run] --hidden--> ... --hidden--> tail [run, norm, head, sample]
    tail --token--> entry (to stream to the client)
    tail --token--> head  (the next decode step; the entry is not an extra hop)

The tail samples on its own until the request ends (end-of-sequence token or max_tokens);
the entry stops it early (stop string, client gone) with a release that follows the
request's path and drops its KV cache on every shard. A lookup (how much of a prompt's prefix
every shard can restore from its prefix cache) follows the same path, and the tail answers
it to the entry. Running a step is `steps.py`'s job
(it returns what to send); decisions (what follows a run, KV admission, where a release
goes, expiry) are pure functions in `decisions.py`; this module is the loop and the sending.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable

import psutil

from dnet.prefix.budget import default_capacity
from dnet.prefix.store import PrefixStats, PrefixStore
from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring import frames
from dnet.ring.frames import (
    FrameRejected,
    Lookup,
    Release,
    RequestStep,
    ShardView,
    Status,
    Step,
    TrainStep,
)
from dnet.ring.links import TCP, Transport
from dnet.shard import decisions
from dnet.shard.decisions import DEFAULT_KV_TTL_S, TOMBSTONE_TTL_S
from dnet.shard.inbox import (
    EntryGone,
    Inbound,
    LinkBroken,
    Outbox,
    PrefixCapacity,
    Rejected,
    Retarget,
    Stop,
)
from dnet.shard.requests import (
    ActiveRequest,
    KvReservations,
    RequestIds,
    RequestTable,
    TrainCaches,
)
from dnet.shard.router import RouteError, Router
from dnet.shard.steps import Dropped, Filled, Forward, Refused, StepRunner, Unrestorable
from dnet.shard.tail import Tail, TailOutput
from dnet.stage import Stage

log = logging.getLogger(__name__)

__all__ = ["FrameRejected", "ShardRuntime"]


class ShardRuntime:
    """A shard's compute loop over a `Stage` loaded by `load_stage` on its own thread.

    `router` says where activations go after this shard's runs; `transport` is how links
    reach other members (the TCP data plane, or `dnet.ring.memory.MemoryNetwork` in one
    process).
    `kv_cap_bytes` caps the KV cache requests may reserve here (default: half the memory
    available once the stage is loaded); past it a new request gets a clear 503.
    `prefix_cache_bytes` bounds the prefix cache (0: off; default: `dnet.prefix.budget`'s
    share of the memory available once the stage is loaded).
    """

    def __init__(self, load_stage: Callable[[], Stage], router: Router, *, model_name: str,
                 kv_ttl_s: float = DEFAULT_KV_TTL_S, epoch: int = 0,
                 kv_cap_bytes: int | None = None, transport: Transport = TCP,
                 prefix_cache_bytes: int | None = None) -> None:
        self._load_stage = load_stage
        self._router = router
        self._epoch = epoch
        self.model_name = model_name
        self.kv_ttl_s = kv_ttl_s
        self._kv_cap_bytes = kv_cap_bytes
        self._clock = time.monotonic  # what requests' use and expiry are measured with
        self._stage: Stage | None = None
        self._run_ends: dict[int, int] = {}  # held layer -> the end of its contiguous run
        self._view: ShardView | None = None  # what gRPC threads check frames against
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._inbox: queue.SimpleQueue[Inbound] = queue.SimpleQueue()
        self._requests = RequestTable()
        self._ids = RequestIds(TOMBSTONE_TTL_S)
        self._trains = TrainCaches()
        self._kv = KvReservations(kv_cap_bytes)
        self._prefix_cache_bytes = prefix_cache_bytes
        self._prefix: PrefixStore | None = None  # built once the stage is loaded
        self._lookups: dict[str, tuple[str, str]] = {}  # request -> (entry, sent to)
        self._tail: Tail | None = None
        self._steps: StepRunner | None = None  # built once the stage is loaded
        self._identity = uuid.uuid4().hex[:12]  # counted by the tail to learn the stages
        self._out = Outbox(self._inbox.put, transport)
        self._thread = threading.Thread(target=self._run, name="compute", daemon=True)
        self._stopped = False

    # ----- lifecycle (any thread) ------------------------------------------------------

    def start(self) -> None:
        """Load the stage on the compute thread and start serving; raises if loading fails."""
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    def stop(self) -> None:
        """Stop computing, free the stage and close the links; a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        self._inbox.put(Stop())
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._stage is not None:
            self._stage.close()
        self._out.close()

    @property
    def stage(self) -> Stage:
        """The loaded stage; raises RuntimeError before `start` loaded it."""
        if self._stage is None:
            raise RuntimeError("the shard's stage is not loaded")
        return self._stage

    @property
    def ready(self) -> bool:
        return self._loaded.is_set() and self._load_error is None

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def active_requests(self) -> int:
        return len(self._requests)

    @property
    def kv_reserved_bytes(self) -> int:
        return self._kv.reserved_bytes

    @property
    def prefix_stats(self) -> PrefixStats | None:
        """The prefix cache's size and hits (None before the stage is loaded)."""
        return self._prefix.stats if self._prefix is not None else None

    def set_prefix_capacity(self, capacity_bytes: int) -> None:
        """Let the prefix cache hold `capacity_bytes` from now on (0 turns it off)."""
        self._inbox.put(PrefixCapacity(capacity_bytes))

    def retarget(self, router: Router, epoch: int) -> None:
        """Serve a new plan epoch with the same layers: keep the weights, drop the requests."""
        self._epoch = epoch
        if self._view is not None:
            self._view = ShardView(epoch, self._view.held, self._view.vocab_size,
                                   self._view.hidden_size)
        self._inbox.put(Retarget(router, epoch))

    # ----- called from gRPC threads ----------------------------------------------------

    def accept(self, frame: pb.Frame) -> None:
        """Check a frame and queue it for the compute thread; raises FrameRejected."""
        view = self._view
        if view is None:
            raise FrameRejected(Status.FAILED_PRECONDITION, "the shard is still loading")
        message = frames.parse(frame, view)
        if isinstance(message, Release | Lookup) or self._ids.admit(message):
            self._inbox.put(message)

    def release(self, request_id: str, propagate: bool, head: str = "") -> None:
        """Drop a request's KV cache here and, with `propagate`, on every later shard."""
        self._inbox.put(Release(request_id, self.stage.layers[0] if propagate else None, head,
                                self._epoch))

    # ----- the compute thread ----------------------------------------------------------

    def _run(self) -> None:
        if not self._load():
            return
        while True:
            # Wake for the next item, or when the oldest idle request or tombstone expires.
            wake = decisions.next_wake([
                decisions.expiry_deadline(self._requests.oldest_use(), self.kv_ttl_s),
                decisions.expiry_deadline(self._ids.oldest_release(), TOMBSTONE_TTL_S),
                self._prefix.next_expiry() if self._prefix is not None else None])
            try:
                item = self._inbox.get(timeout=None if wake is None
                                       else max(0.0, wake - self._clock()))
            except queue.Empty:
                item = None
            if isinstance(item, Stop):
                return
            if item is not None:
                self._handle_safely(item)
            now = self._clock()
            if wake is not None and now >= wake:
                self._sweep(now)

    def _handle_safely(self, item: Inbound) -> None:
        try:
            self._handle(item)
        except Exception as exc:  # one request's failure must not stop the shard
            failed = list(item.rows.request_ids) if isinstance(item, Step) else (
                [item.request_id] if isinstance(item, Lookup) else [])
            log.exception("request(s) %s failed on this shard", ", ".join(failed))
            for request_id in failed:
                self._fail(request_id, 500, f"shard error: {exc}")

    def _load(self) -> bool:
        try:
            stage = self._load_stage()
            vocab_size = int(stage.config["vocab_size"])
            available = psutil.virtual_memory().available
            if self._kv_cap_bytes is None:
                self._kv = KvReservations(available // 2)
            capacity = self._prefix_cache_bytes
            self._prefix = PrefixStore(default_capacity(available, 0) if capacity is None
                                       else capacity, stage.new_caches())
            self._stage = stage
            self._run_ends = {layer: end for start, end in stage.runs
                              for layer in range(start, end)}
            if stage.holds_head:
                self._tail = Tail(stage, self._requests)
            self._steps = StepRunner(stage, self._requests, self._trains, self._kv, self._tail,
                                     vocab_size, self._identity, self._clock, self._prefix)
            self._view = ShardView(self._epoch, frozenset(stage.layers), vocab_size,
                                   stage.hidden_size)
            return True
        except BaseException as exc:  # handed to start(), which raises it in the caller
            self._load_error = exc
            return False
        finally:
            self._loaded.set()

    def _handle(self, item: Inbound) -> None:
        match item:
            case RequestStep() | TrainStep():
                self._step(item)
            case Release():
                self._release(item)
            case Lookup():
                self._look_up(item)
            case Rejected(request_id, code, reason):
                # A train's rejection fails every member; a request's, the request.
                status = decisions.rejection_status(code)
                for member in self._trains.members(request_id) or [request_id]:
                    self._fail(member, status, f"next shard rejected a frame: {reason}")
            case LinkBroken(address, reason):
                self._router.forget(address)
                lost = [r for r, (_, sent_to) in self._lookups.items() if sent_to == address]
                for request_id in self._requests.sent_to(address) + lost:
                    self._fail(request_id, 503,
                               f"ring member {address} is unreachable ({reason})")
            case EntryGone(address, _):
                for request_id in self._requests.from_entry(address):
                    log.info("entry %s is gone; releasing %s round the ring", address,
                             request_id)
                    self._release_everywhere(request_id)
            case Retarget(router, _):
                if self._tail is not None:
                    self._tail.reset()  # no train goes on; the new ring's size is relearned
                for request_id in self._requests:
                    self._drop(request_id)
                self._lookups.clear()
                self._prefix_store.forget_all()  # the blocks stay: same layers, same model
                self._router = router
            case PrefixCapacity(capacity_bytes):
                self._prefix_store.resize(capacity_bytes)

    # ----- steps ------------------------------------------------------------------------

    def _step(self, step: Step) -> None:
        assert self._steps is not None
        if isinstance(step, RequestStep) and step.opening is not None:
            self._lookups.pop(step.request_id, None)  # the request itself is tracked now
        match self._steps.run(step):
            case Forward(out, requests):
                self._forward(out, requests)
            case TailOutput(steps, tokens):
                for next_step in steps:  # on the critical path; the clients' copies are not
                    self._send_step(next_step)
                for entry, token in tokens:
                    self._out.token(entry, token)
            case Unrestorable(request_id, entry, message):
                log.error("cannot restore the prefix of %s: %s", request_id, message)
                self._ids.release(request_id, self._clock())
                if entry:
                    self._out.token(entry, frames.failure(request_id, 503, message))
            case Refused(request_id, entry, refusal):
                log.warning("refused %s: its KV cache (%d bytes) would pass the cap (%d of %d "
                            "bytes reserved)", request_id, refusal.need, refusal.reserved,
                            refusal.cap)
                self._ids.release(request_id, self._clock())
                if entry:
                    self._out.token(entry, frames.failure(request_id, 503, refusal.message))
            case Filled() | Dropped():
                pass

    def _forward(self, step: Step, requests: list[ActiveRequest]) -> None:
        """Send `step` on to the shard holding `step.layer`."""
        try:
            address = self._router.address_for(step.layer, step.head)
        except RouteError as exc:
            for request_id in step.rows.request_ids:
                self._fail(request_id, 503, str(exc))
            return
        for request in requests:
            request.sent_to.add(address)
        self._out.frame(address, step)

    def _send_step(self, step: Step) -> None:
        """The tail's next decode step: into this shard's inbox, or to the head shard."""
        if self.stage.holds_embedding:
            self._inbox.put(step)
            return
        for request_id in step.rows.request_ids:
            request = self._requests.get(request_id)
            if request is not None:
                request.sent_to.add(step.head)
        self._out.frame(step.head, step)

    # ----- prefix-cache lookups ------------------------------------------------------------

    @property
    def _prefix_store(self) -> PrefixStore:
        assert self._prefix is not None  # built with the stage
        return self._prefix

    def _look_up(self, lookup: Lookup) -> None:
        """Pin what this shard can restore of the prompt, and pass the lookup on with the
        least depth so far; the run that ends the model answers the entry."""
        self._lookups[lookup.request_id] = (lookup.entry, "")
        depth = self._prefix_store.look_up(lookup.request_id, lookup.keys, lookup.depth,
                                           self._clock(), self.kv_ttl_s)
        onward = decisions.release_onward(lookup.layer, self._run_ends, self.stage.num_layers)
        if onward is None:
            self._out.token(lookup.entry, frames.lookup_reply(lookup.request_id, depth))
            return
        try:
            address = self._router.address_for(onward, lookup.head)
        except RouteError as exc:
            self._fail(lookup.request_id, 503, str(exc))
            return
        self._lookups[lookup.request_id] = (lookup.entry, address)
        self._out.frame(address, Lookup(lookup.request_id, onward, lookup.keys, depth,
                                        lookup.entry, lookup.head, lookup.epoch))

    # ----- ending requests --------------------------------------------------------------

    def _release(self, release: Release) -> None:
        self._drop(release.request_id)
        stage = self.stage
        onward = decisions.release_onward(release.layer, self._run_ends, stage.num_layers)
        if onward is None:
            return
        try:
            address = self._router.address_for(onward, release.head)
        except RouteError as exc:
            log.warning("cannot pass on the release of %s: %s", release.request_id, exc)
            return
        self._out.frame(address, Release(release.request_id, onward, release.head,
                                         release.epoch))

    def _release_everywhere(self, request_id: str) -> None:
        request = self._requests.get(request_id)
        head = request.head if request is not None else ""
        release = Release(request_id, 0, head, self._epoch)
        if self.stage.holds_embedding:
            self._release(release)
        else:
            self._drop(request_id)
            self._out.frame(head, release)

    def _drop(self, request_id: str) -> None:
        self._kv.release(request_id)
        self._lookups.pop(request_id, None)
        self._prefix_store.forget(request_id)
        request = self._requests.pop(request_id)
        if request is not None:
            self._trains.leave(request_id, request)
        if self._tail is not None:
            for step in self._tail.forget(request_id):
                self._send_step(step)
        self._ids.release(request_id, self._clock())

    def _fail(self, request_id: str, code: int, message: str) -> None:
        """Tell the request's entry it failed (a request, or a lookup not yet followed by its
        request), and drop it here."""
        request = self._requests.get(request_id)
        lookup = self._lookups.get(request_id)
        if request is None and lookup is None:
            return
        entry = request.entry if request is not None else lookup[0] if lookup else ""
        self._drop(request_id)
        if entry:
            self._out.token(entry, frames.failure(request_id, code, message))

    def _sweep(self, now: float) -> None:
        for request_id in self._requests.expired(now, self.kv_ttl_s):
            log.warning("request %s idle for more than %.0f s: dropping its KV cache",
                        request_id, self.kv_ttl_s)
            self._drop(request_id)
        for request_id in self._prefix_store.expire(now):
            log.warning("request %s did not open within %.0f s of its prefix lookup: "
                        "unpinning its blocks", request_id, self.kv_ttl_s)
            self._lookups.pop(request_id, None)
        self._ids.prune(now)
