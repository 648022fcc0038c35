"""The HTTP API of a mesh node: the engine's endpoints, plus the topology and model loading.

Every node answers the same way: the node that receives a request tokenizes it and owns it,
sending it to the current plan's head shard. When no ring can serve, every node answers
every generating endpoint with the same 503 `server_error`, whose message is the
coordinator's reason (Node.unavailable).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from discovery.peers import PeerInfo, is_healthy
from dnet.api.app import HttpOptions, create_app
from dnet.api.errors import ApiError
from dnet.entry import Timeouts
from dnet.node.control import FailureKind, UnavailableKind
from dnet.node.coordinator import LoadFailed
from dnet.node.host import ServedModel
from dnet.proto import dnet_ring_pb2 as pb
from dnet.serving import accepts_model

if TYPE_CHECKING:
    from dnet.node.node import Node

class MeshBackend:
    """The cluster's current model, as the HTTP layer sees it."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def ensure_available(self) -> None:
        """Raise the mesh's 503 when no ring can serve a request now. A node the ring serves
        without it yet (just joined or restarted, its plan on the way) holds the request until
        its plan commits, as long as a re-planning entry would (Timeouts.admission_s)."""
        verdict = self.node.unavailable()
        if verdict is not None and verdict.kind is UnavailableKind.JOINING:
            await asyncio.to_thread(self.node.host.wait_served, Timeouts().admission_s)
            verdict = self.node.unavailable()
        if verdict is not None:
            raise ApiError(503, verdict.message, kind="server_error")

    def _served(self) -> ServedModel:
        verdict = self.node.unavailable()
        if verdict is not None:
            raise ApiError(503, verdict.message, kind="server_error")
        served = self.node.host.served
        if served is None:  # the plan changed under us: say so, the same way
            raise ApiError(503, "the mesh is re-planning; please retry", kind="server_error")
        return served

    @property
    def model_name(self) -> str:
        served = self.node.host.served
        return served.name if served else ""

    @property
    def tokenizer(self) -> Any:
        return self._served().tokenizer

    @property
    def max_context(self) -> int:
        return self._served().max_context

    @property
    def vocab_size(self) -> int:
        return self._served().vocab_size

    def accepts_model(self, name: str | None) -> bool:
        return accepts_model(self._served().name, name)

    def generate(self, prompt: list[int], sampling: pb.SamplingParams) -> AsyncIterator[pb.Token]:
        return self.node.entry.generate(prompt, sampling)


class LoadBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str


def create_node_app(node: Node) -> FastAPI:
    options = HttpOptions(api_key=node.options.api_key, cors_origins=node.options.cors_origins,
                          special_tokens_in_messages=node.options.special_tokens_in_messages)
    app = create_app(MeshBackend(node), options=options, extra_health=lambda: {
        "role": "node", "node_id": node.node_id, "epoch": node.host.epoch})

    @app.get("/v1/topology")
    async def topology() -> dict[str, Any]:
        return await asyncio.to_thread(build_topology, node)

    @app.post("/v1/models/load")
    async def load(body: LoadBody) -> dict[str, Any]:
        if not body.model.strip():
            raise ApiError(400, "model must not be empty", param="model")
        try:
            await asyncio.to_thread(node.load_model, body.model)
        except LoadFailed as exc:
            raise ApiError(400, str(exc), param="model") from exc
        return {"model": body.model, "epoch": node.host.epoch}

    return app


def build_topology(node: Node) -> dict[str, Any]:
    """The mesh as this node knows it: plan, members, health, what each reports, and the
    coordinator's word (who is excluded and why, why no ring can serve)."""
    # Unverified entries are adverts no health check has reached: mDNS caches keep a crashed
    # node's record long after it died, so those are not shown.
    peers = {state.info.node_id: state for state in node.membership.states() if state.verified}
    me = node.membership.me
    known = {me.node_id: me, **{node_id: s.info for node_id, s in peers.items()}}
    statuses = node.peer_statuses([info.grpc_address for info in known.values()])
    plan = node.mesh_plan(statuses)
    members = {m.node_id: m for m in plan.members} if plan else {}
    word = node.mesh_word()
    excluded = {e.node_id: e for e in word.excluded} if word is not None else {}
    nodes = [{
        **_node_entry(info, members.get(node_id), statuses.get(info.grpc_address),
                      excluded.get(node_id)),
        "healthy": node_id == me.node_id or (node_id in peers and is_healthy(peers[node_id])),
        "coordinator": node_id == node.coordinator.coordinator_id,
    } for node_id, info in sorted(known.items())]
    verdict = node.unavailable()
    plan_data = json.loads(plan.plan_json) if plan and plan.plan_json else {}
    measured = [n["decode_tokens_per_s"] for n in nodes if n["decode_tokens_per_s"]]
    return {
        "model": plan.model if plan else "",
        "epoch": plan.epoch if plan else 0,
        "coordinator": node.coordinator.coordinator_id,
        "ring": [m.node_id for m in plan.members if m.layers] if plan else [],
        "nodes": nodes,
        "predicted_ms_per_token": plan_data.get("predicted_ms_per_token"),
        "measured_ms_per_token": 1000.0 / max(measured) if measured else None,
        "rounds": plan_data.get("rounds"),
        "explanation": plan_data.get("explanation", []),
        "unavailable": verdict.message if verdict is not None else "",
        "other_clusters": [{"cluster_id": cluster, "seen": seen}
                           for cluster, seen in sorted(node.membership.other_clusters().items())],
        "this_node": node.node_id,
    }


def _prefix_cache(status: pb.NodeStatus | None) -> dict[str, Any]:
    """The node's shard's prefix cache: bytes held, capacity, and the share of looked-up
    prompt blocks it could restore (None before any lookup, or when nothing reports)."""
    if status is None:
        return {"prefix_cache_bytes": None, "prefix_cache_capacity_bytes": None,
                "prefix_cache_hit_rate": None}
    rate = status.prefix_cache_hit_rate
    return {"prefix_cache_bytes": status.prefix_cache_bytes,
            "prefix_cache_capacity_bytes": status.prefix_cache_capacity_bytes,
            "prefix_cache_hit_rate": round(rate, 4) if rate >= 0 else None}


def _node_entry(info: PeerInfo, member: pb.PlanMember | None, status: pb.NodeStatus | None,
                exclusion: pb.Exclusion | None) -> dict[str, Any]:
    """One node of the topology: its advert, its part of the plan, what it reports."""
    layers = list(member.layers) if member else []
    return {
        "id": info.node_id, "name": info.name, "address": info.address,
        "http_port": info.http_port, "grpc_port": info.grpc_port,
        "memory_budget_bytes": info.memory_budget_bytes,
        "memory_used_bytes": status.memory_used_bytes if status else None,
        "layers": layers, "window": member.window if member else 0,
        "streaming": bool(member and layers and member.window < len(layers)),
        "epoch": status.epoch if status else None,
        "decode_tokens_per_s": status.decode_tokens_per_s if status else None,
        **_prefix_cache(status),
        "platform": info.platform, "chip": info.chip, "version": info.version,
        "excluded": None if exclusion is None else {
            "failure": FailureKind[pb.FailureKind.Name(exclusion.failure)].value,
            "reason": exclusion.reason, "failures": exclusion.failures,
            "retry_in_s": round(exclusion.retry_in_s, 1)},
    }
