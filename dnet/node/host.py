"""A mesh node's part of the current plan: its shard (when it holds layers) and its entry.

The coordinator moves every node from one plan to the next (dnet/node/rollout.py):

1. prepare: while the running ring keeps serving, fetch and check everything this node's new
   part needs (the tokenizer, the weight files of its layers). A node that holds no layers
   of the running ring loads its new layers now; one that does loads them at commit, so two
   sets of layers are never resident at once. Nothing the running ring uses is touched.
2. drain (only when the ring changes): the entry stops admitting; requests in flight end.
3. commit: swap in the prepared part and point the entry at the new ring.
   Or abort: drop what was prepared and carry on with the running plan.

Frames carry the plan's `ring_epoch`, which stays that of the running ring when a plan
leaves every layer in place, so such a plan commits without cutting any request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from dnet.model_files import (
    format_layers,
    num_layers,
    read_config,
    resolve_for_layers,
    resolve_metadata,
)
from dnet.node.control import FailureKind, Holder, Layout
from dnet.proto import dnet_ring_pb2 as pb
from dnet.serving import context_tokens
from dnet.shard.router import MeshRouter, Router

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Assignment:
    """What a node holds under a plan; equal assignments reuse the loaded weights."""

    model: str
    layers: tuple[int, ...]
    window: int


@dataclass
class ServedModel:
    name: str
    tokenizer: Any
    max_context: int
    vocab_size: int


class Runtime(Protocol):
    """What a node needs of a shard runtime (dnet.shard.runtime.ShardRuntime)."""

    epoch: int
    stage: Any  # dnet.stage.Stage, once ready

    @property
    def active_requests(self) -> int: ...

    @property
    def ready(self) -> bool: ...

    @property
    def prefix_stats(self) -> Any: ...  # dnet.prefix.store.PrefixStats, once ready

    def retarget(self, router: Router, epoch: int) -> None: ...

    def set_prefix_capacity(self, capacity_bytes: int) -> None: ...

    def stop(self) -> None: ...


class Entry(Protocol):
    """What the host needs of its entry (dnet.entry.RingEntry)."""

    def pause(self) -> None: ...

    def drain(self, timeout_s: float) -> int: ...

    def resume(self, head: str, epoch: int) -> None: ...


LoadRuntime = Callable[[str, tuple[int, ...], int, Router, int], Runtime]
# Called once a plan is committed, with the runtime this node now runs (None: no layers).
OnCommit = Callable[[pb.PlanRequest, Runtime | None], None]


class PrepareError(Exception):
    """This node cannot take its part in a plan; `kind` says why."""

    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class NotPrepared(Exception):
    """Commit or abort of an epoch this node has not prepared."""


class Step(Enum):
    """What committing a prepared plan does to this node's layers."""

    KEEP = "keep"  # same layers: keep the runtime (retarget it when the ring changed)
    SWAP = "swap"  # new layers already loaded at prepare: swap them in
    LOAD = "load"  # new layers, loaded at commit once the old ones are gone
    DROP = "drop"  # no layers any more


@dataclass
class _Prepared:
    plan: pb.PlanRequest
    served: ServedModel
    assignment: Assignment | None
    step: Step
    runtime: Runtime | None = None  # loaded at prepare (SWAP)


def ring_epoch(plan: pb.PlanRequest) -> int:
    """The epoch frames of this plan carry (plans from before ring_epoch carry their own)."""
    return plan.ring_epoch or plan.epoch


def head_address(plan: pb.PlanRequest) -> str:
    for member in plan.members:
        if 0 in member.layers:
            return member.grpc_address
    raise ValueError(f"plan epoch {plan.epoch} assigns layer 0 to nobody")


def layer_owners(plan: pb.PlanRequest) -> dict[int, str]:
    return {layer: member.grpc_address for member in plan.members for layer in member.layers}


def layout_of(plan: pb.PlanRequest) -> Layout:
    return Layout(plan.model, tuple(
        Holder(m.node_id, m.grpc_address, tuple(m.layers), m.window)
        for m in plan.members if m.layers))


def failure_of(exc: BaseException) -> FailureKind:
    """Out of memory (Python's MemoryError, or an allocator's error) or a load error."""
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "out of memory" in text or "malloc" in text:
        return FailureKind.OUT_OF_MEMORY
    return FailureKind.LOAD_ERROR


class EpochHost:
    def __init__(self, node_id: str, entry: Entry, *, load_runtime: LoadRuntime,
                 check_layers: Callable[[str, tuple[int, ...]], None] | None = None,
                 load_served: Callable[[str], ServedModel] | None = None,
                 on_commit: OnCommit | None = None) -> None:
        self.node_id = node_id
        self.entry = entry
        self.plan: pb.PlanRequest | None = None  # committed
        self.runtime: Runtime | None = None
        self.served: ServedModel | None = None
        self._load_runtime = load_runtime
        self._check_layers = check_layers or check_layers_loadable
        self._load_served = load_served or load_served_model
        self._on_commit = on_commit
        self._assignment: Assignment | None = None
        self._prepared: _Prepared | None = None
        self._lock = threading.Lock()  # one plan change at a time
        # Who waits for a plan change to land (frames of the coming ring, requests on a node
        # that has not joined yet), woken when it does; apart from _lock, which a commit
        # holds while it loads layers.
        self._changed = threading.Condition()
        self._switching: int | None = None  # the ring epoch prepared and not yet committed

    @property
    def epoch(self) -> int:
        return self.plan.epoch if self.plan else 0

    def my_member(self, plan: pb.PlanRequest | None = None) -> pb.PlanMember | None:
        plan = plan or self.plan
        if plan is None:
            return None
        return next((m for m in plan.members if m.node_id == self.node_id), None)

    # ----- the three steps ------------------------------------------------------------------

    def prepare(self, plan: pb.PlanRequest) -> None:
        """Get ready for `plan` without disturbing the running ring.

        Raises PrepareError (LOAD_ERROR or OUT_OF_MEMORY) when this node cannot take its part.
        """
        with self._lock:
            self._discard_prepared()
            member = self.my_member(plan)
            layers = tuple(sorted(member.layers)) if member else ()
            assignment = Assignment(plan.model, layers, member.window) if layers else None
            try:
                served = self._served_model(plan.model)
                step = self._step_for(assignment)
                runtime = None
                if step is Step.LOAD and self.runtime is None:
                    runtime = self._load(plan, assignment)
                    step = Step.SWAP
                elif step is Step.LOAD:
                    self._check_layers(plan.model, layers)
            except Exception as exc:  # any load failure goes back to the coordinator, named
                log.exception("epoch %d: cannot prepare %s", plan.epoch, plan.model)
                raise PrepareError(failure_of(exc), f"{type(exc).__name__}: {exc}") from exc
            self._prepared = _Prepared(plan, served, assignment, step, runtime)
            self._switch_to(ring_epoch(plan))

    def drain(self, timeout_s: float) -> int:
        self.entry.pause()
        failed = self.entry.drain(timeout_s)
        if failed:
            log.warning("re-planning: failed %d request(s) still running after %.0f s",
                        failed, timeout_s)
        return failed

    def commit(self, epoch: int) -> None:
        """Switch to the prepared plan. Raises NotPrepared, or PrepareError when a load
        deferred to this point fails (then this node holds no layers)."""
        with self._lock:
            try:
                self._commit(self._take_prepared(epoch))
            finally:
                self._switch_to(None)
        member = self.my_member()
        held = format_layers(member.layers) if member and member.layers else "no layers"
        log.info("epoch %d committed: model %s, this node holds %s", epoch,
                 self.plan.model if self.plan else "", held)

    def _commit(self, prepared: _Prepared) -> None:
        plan = prepared.plan
        if prepared.step is Step.KEEP:
            self._retarget(plan)
        else:
            self._stop_runtime()
            runtime = prepared.runtime
            if prepared.step is Step.LOAD:
                try:
                    runtime = self._load(plan, prepared.assignment)
                except Exception as exc:
                    log.exception("epoch %d: cannot load layers", plan.epoch)
                    raise PrepareError(failure_of(exc),
                                       f"{type(exc).__name__}: {exc}") from exc
            self.runtime = runtime
            self._assignment = prepared.assignment
        self.plan, self.served = plan, prepared.served
        if self._on_commit is not None:
            self._on_commit(plan, self.runtime)
        self.entry.resume(head_address(plan), ring_epoch(plan))

    def wait_served(self, timeout_s: float) -> bool:
        """Block until a plan is committed here (a model is served), at most `timeout_s`
        seconds; whether one is. Call from a thread, never the event loop."""
        with self._changed:
            return self._changed.wait_for(lambda: self.served is not None, timeout_s)

    def runtime_for(self, epoch: int, timeout_s: float) -> Runtime | None:
        """The runtime to hand a frame of ring `epoch`. While this node is switching to that
        ring (prepared, or committing: loading its layers), wait for the switch, at most
        `timeout_s` seconds, so a frame from a member that switched first is not refused.
        Call from a thread, never the event loop."""
        with self._changed:
            self._changed.wait_for(lambda: self._switching != epoch, timeout_s)
            return self.runtime

    def _switch_to(self, epoch: int | None) -> None:
        with self._changed:
            self._switching = epoch
            self._changed.notify_all()

    def abort(self, epoch: int) -> None:
        """Drop what was prepared for `epoch` and carry on with the running plan (resuming
        the entry, should a drain have paused it)."""
        with self._lock:
            if self._prepared is not None and self._prepared.plan.epoch == epoch:
                self._discard_prepared()
            if self.plan is not None:
                self.entry.resume(head_address(self.plan), ring_epoch(self.plan))

    def stop(self) -> None:
        with self._lock:
            self._discard_prepared()
            self._stop_runtime()

    # ----- internals ------------------------------------------------------------------------

    def _step_for(self, assignment: Assignment | None) -> Step:
        if assignment is None:
            return Step.DROP if self.runtime is not None else Step.KEEP
        if assignment == self._assignment and self.runtime is not None:
            return Step.KEEP
        return Step.LOAD

    def _take_prepared(self, epoch: int) -> _Prepared:
        prepared = self._prepared
        if prepared is None or prepared.plan.epoch != epoch:
            raise NotPrepared(f"no prepared plan for epoch {epoch}")
        self._prepared = None
        return prepared

    def _discard_prepared(self) -> None:
        prepared, self._prepared = self._prepared, None
        self._switch_to(None)
        if prepared is not None and prepared.runtime is not None:
            prepared.runtime.stop()

    def _retarget(self, plan: pb.PlanRequest) -> None:
        runtime = self.runtime
        if runtime is not None and runtime.epoch != ring_epoch(plan):
            runtime.retarget(MeshRouter(layer_owners(plan)), ring_epoch(plan))
            log.info("epoch %d: keeping layers %s", plan.epoch,
                     format_layers(self._assignment.layers if self._assignment else ()))

    def _stop_runtime(self) -> None:
        runtime, self.runtime = self.runtime, None
        self._assignment = None
        if runtime is not None:
            runtime.stop()  # free the old layers before loading new ones

    def _load(self, plan: pb.PlanRequest, assignment: Assignment | None) -> Runtime:
        assert assignment is not None
        log.info("epoch %d: loading layers %s of %s (window %d)", plan.epoch,
                 format_layers(assignment.layers), plan.model, assignment.window)
        return self._load_runtime(plan.model, assignment.layers, assignment.window,
                                  MeshRouter(layer_owners(plan)), ring_epoch(plan))

    def _served_model(self, model: str) -> ServedModel:
        if self.served is not None and self.served.name == model:
            return self.served
        return self._load_served(model)


def load_served_model(model: str) -> ServedModel:
    """The tokenizer and limits an entry needs to serve `model` (fetching its metadata)."""
    from dnet.tokenizer import load_chat_tokenizer  # loads MLX: only when a model is served

    model_dir: Path = resolve_metadata(model)
    config = read_config(model_dir)
    return ServedModel(name=model, tokenizer=load_chat_tokenizer(model_dir),
                       max_context=context_tokens(config),
                       vocab_size=int(config["vocab_size"]))


def check_layers_loadable(model: str, layers: tuple[int, ...]) -> None:
    """Fetch the files `layers` of `model` need, and check the model has those layers."""
    model_dir = resolve_for_layers(model, layers)
    total = num_layers(read_config(model_dir))
    if not layers or max(layers) >= total:
        raise ValueError(f"{model} has {total} layers; the plan gives this node "
                         f"{format_layers(layers)}")
