"""The HTTP API of a mesh node: the engine's endpoints, plus the topology and model loading.

Every node answers the same way: the node that receives a request tokenizes it and owns it,
sending it to the current plan's head shard.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from discovery.peers import is_healthy
from dnet.api.app import HttpOptions, create_app
from dnet.api.errors import ApiError
from dnet.node.host import ServedModel
from dnet.proto import dnet_ring_pb2 as pb

if TYPE_CHECKING:
    from dnet.node.node import Node

DEFAULT_MODEL_ALIAS = "default_model"


class MeshBackend:
    """The cluster's current model, as the HTTP layer sees it."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def _served(self) -> ServedModel:
        served = self.node.host.served
        if served is None:
            error = self.node.coordinator.last_error
            raise ApiError(503, "no model is running yet" + (f": {error}" if error else
                           "; start a node with --model or run `dnet load MODEL`"),
                           kind="server_error")
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
        served = self._served()
        return not name or name in (served.name, DEFAULT_MODEL_ALIAS,
                                    served.name.rstrip("/").split("/")[-1])

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
        error = await asyncio.to_thread(node.load_model, body.model)
        if error:
            raise ApiError(400, error, param="model")
        return {"model": body.model, "epoch": node.host.epoch}

    return app


def build_topology(node: Node) -> dict[str, Any]:
    """The mesh as this node knows it: plan, members, health, and what each reports."""
    plan = node.host.plan
    members = {m.node_id: m for m in plan.members} if plan else {}
    # Unverified entries are adverts no health check has reached: mDNS caches keep a crashed
    # node's record long after it died, so those are not shown.
    peers = {state.info.node_id: state for state in node.membership.states() if state.verified}
    me = node.membership.me
    known = {me.node_id: me, **{node_id: s.info for node_id, s in peers.items()}}
    statuses = node.peer_statuses([info.grpc_address for info in known.values()])
    plan_data = json.loads(plan.plan_json) if plan and plan.plan_json else {}
    nodes = []
    for node_id, info in sorted(known.items()):
        member = members.get(node_id)
        status = statuses.get(info.grpc_address)
        layers = list(member.layers) if member else []
        nodes.append({
            "id": node_id, "name": info.name, "address": info.address,
            "http_port": info.http_port, "grpc_port": info.grpc_port,
            "memory_budget_bytes": info.memory_budget_bytes,
            "memory_used_bytes": status.memory_used_bytes if status else None,
            "layers": layers, "window": member.window if member else 0,
            "streaming": bool(member and layers and member.window < len(layers)),
            "healthy": node_id == me.node_id or (node_id in peers
                                                 and is_healthy(peers[node_id])),
            "coordinator": node_id == node.coordinator.coordinator_id,
            "epoch": status.epoch if status else None,
            "decode_tokens_per_s": status.decode_tokens_per_s if status else None,
            "platform": info.platform, "chip": info.chip, "version": info.version,
        })
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
        "last_error": node.coordinator.last_error,
        "this_node": node.node_id,
    }
