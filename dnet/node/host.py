"""A mesh node's part of the current plan: its shard (when it holds layers) and its entry.

Plans change in three steps the coordinator drives on every node, so a request always runs
on one epoch's ring: drain (stop admitting requests, let those in flight end), prepare
(load the new layers, serve the new epoch's frames), commit (point the entry at the new
ring and admit requests again).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dnet.entry import RingEntry
from dnet.model_files import format_layers, read_config, resolve_for_layers, resolve_metadata
from dnet.proto import dnet_ring_pb2 as pb
from dnet.shard.router import MeshRouter
from dnet.shard.runtime import ShardRuntime
from dnet.stage import Stage
from dnet.tokenizer import load_chat_tokenizer

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


def head_address(plan: pb.PlanRequest) -> str:
    for member in plan.members:
        if 0 in member.layers:
            return member.grpc_address
    raise ValueError(f"plan epoch {plan.epoch} assigns layer 0 to nobody")


def layer_owners(plan: pb.PlanRequest) -> dict[int, str]:
    return {layer: member.grpc_address for member in plan.members for layer in member.layers}


class EpochHost:
    def __init__(self, node_id: str, entry: RingEntry, *, kv_ttl_s: float,
                 kv_cap_bytes: int | None = None) -> None:
        self.node_id = node_id
        self.entry = entry
        self.kv_ttl_s = kv_ttl_s
        self.kv_cap_bytes = kv_cap_bytes
        self.plan: pb.PlanRequest | None = None  # committed
        self.runtime: ShardRuntime | None = None
        self.served: ServedModel | None = None
        self._pending: tuple[pb.PlanRequest, ShardRuntime | None, ServedModel] | None = None
        self._assignment: Assignment | None = None
        self._lock = threading.Lock()  # one plan change at a time

    @property
    def epoch(self) -> int:
        return self.plan.epoch if self.plan else 0

    def my_member(self, plan: pb.PlanRequest | None = None) -> pb.PlanMember | None:
        plan = plan or self.plan
        if plan is None:
            return None
        return next((m for m in plan.members if m.node_id == self.node_id), None)

    def drain(self, timeout_s: float) -> int:
        self.entry.pause()
        failed = self.entry.drain(timeout_s)
        if failed:
            log.warning("re-planning: failed %d request(s) still running after %.0f s",
                        failed, timeout_s)
        return failed

    def prepare(self, plan: pb.PlanRequest) -> None:
        """Load this node's layers of `plan`; raises when they cannot be loaded."""
        with self._lock:
            member = self.my_member(plan)
            layers = tuple(sorted(member.layers)) if member else ()
            assignment = Assignment(plan.model, layers, member.window if member else 0)
            runtime = self.runtime
            router = MeshRouter(layer_owners(plan))
            if runtime is not None and assignment == self._assignment:
                runtime.retarget(router, plan.epoch)
                log.info("epoch %d: keeping layers %s", plan.epoch, format_layers(layers))
            else:
                if runtime is not None:
                    runtime.stop()  # free the old layers before loading the new ones
                    self.runtime = None
                    self._assignment = None
                runtime = self._load(plan, layers, assignment.window, router) if layers else None
            served = self._served_model(plan.model)
            self._pending = (plan, runtime, served)
            self._assignment = assignment if layers else None
            self.runtime = runtime

    def commit(self, epoch: int) -> None:
        with self._lock:
            if self._pending is None or self._pending[0].epoch != epoch:
                raise ValueError(f"no prepared plan for epoch {epoch}")
            plan, runtime, served = self._pending
            self._pending = None
            self.plan, self.runtime, self.served = plan, runtime, served
            self.entry.resume(head_address(plan), plan.epoch)
        member = self.my_member()
        held = format_layers(member.layers) if member and member.layers else "no layers"
        log.info("epoch %d committed: model %s, this node holds %s", epoch, plan.model, held)

    def stop(self) -> None:
        if self.runtime is not None:
            self.runtime.stop()
            self.runtime = None

    def _load(self, plan: pb.PlanRequest, layers: tuple[int, ...], window: int,
              router: MeshRouter) -> ShardRuntime:
        log.info("epoch %d: loading layers %s of %s (window %d)", plan.epoch,
                 format_layers(layers), plan.model, window)
        model_dir = resolve_for_layers(plan.model, layers)
        runtime = ShardRuntime(lambda: Stage(model_dir, list(layers), window=window or None),
                               router, model_name=plan.model, kv_ttl_s=self.kv_ttl_s,
                               epoch=plan.epoch, kv_cap_bytes=self.kv_cap_bytes)
        runtime.start()
        return runtime

    def _served_model(self, model: str) -> ServedModel:
        if self.served is not None and self.served.name == model:
            return self.served
        model_dir: Path = resolve_metadata(model)
        config = read_config(model_dir)
        return ServedModel(name=model, tokenizer=load_chat_tokenizer(model_dir),
                           max_context=int(config.get("max_position_embeddings") or 4096),
                           vocab_size=int(config["vocab_size"]))
