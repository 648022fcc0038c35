"""The planner's output: plain dataclasses that round-trip through JSON.

Layer order: with ring d_0..d_{m-1}, per-round run lengths n_i and W = sum(n_i), round r gives
d_i the layers [r*W + P_i, r*W + P_i + n_i) with P_i = n_0 + ... + n_{i-1}, cut at the last
layer. So every round but the last is full; in the last round a prefix of the ring gets full
runs, one device (the tail) a possibly shorter run, and the devices after it nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from planner.devices import PlanOptions


class InfeasiblePlanError(ValueError):
    """No plan fits in memory, even streaming every layer it can. Names the shortfall in bytes.

    `shortfall_bytes` is the least total by which the devices' budgets would have to grow for
    some plan to fit (minimised over all plans), and `per_device_shortfall` splits it up.
    """

    def __init__(
        self, message: str, shortfall_bytes: int, per_device_shortfall: Mapping[str, int]
    ) -> None:
        super().__init__(message)
        self.shortfall_bytes = shortfall_bytes
        self.per_device_shortfall = dict(per_device_shortfall)


@dataclass(frozen=True)
class DevicePlan:
    """One ring member: its layers (ascending), window and predicted share of a token's time."""

    id: str
    layers: tuple[int, ...]
    window: int
    layers_per_round: int
    holds_embedding: bool
    holds_head: bool
    memory_bytes: int
    memory_budget_bytes: int
    compute_ms: float
    disk_ms: float
    network_ms: float

    @property
    def streamed_layers(self) -> int:
        held = len(self.layers)
        return 0 if self.window >= held else held - max(self.window - 2, 0)

    @property
    def total_ms(self) -> float:
        return self.compute_ms + self.disk_ms + self.network_ms


@dataclass(frozen=True)
class Plan:
    """A layer assignment, ring order and windows, with its predicted decode time per token."""

    model: str
    num_layers: int
    ring: tuple[str, ...]
    rounds: int
    hops_per_token: int
    predicted_ms_per_token: float
    compute_ms: float
    disk_ms: float
    network_ms: float
    embedding_device: str
    head_device: str
    devices: tuple[DevicePlan, ...]
    left_out: tuple[str, ...]
    explanation: tuple[str, ...]
    exact: bool
    options: PlanOptions

    def device(self, device_id: str) -> DevicePlan:
        for member in self.devices:
            if member.id == device_id:
                return member
        raise KeyError(device_id)

    @property
    def period_ms(self) -> float:
        """The pipeline's period: the busiest device's compute + disk per token. Chunks of a
        long prompt, and trains of concurrent requests, leave the ring one per period."""
        return max(member.compute_ms + member.disk_ms for member in self.devices)

    def layer_owner(self) -> list[str]:
        owner = [""] * self.num_layers
        for member in self.devices:
            for layer in member.layers:
                owner[layer] = member.id
        return owner


def _device_to_dict(member: DevicePlan) -> dict[str, Any]:
    return {
        "id": member.id,
        "layers": list(member.layers),
        "window": member.window,
        "layers_per_round": member.layers_per_round,
        "streamed_layers": member.streamed_layers,
        "holds_embedding": member.holds_embedding,
        "holds_head": member.holds_head,
        "memory_bytes": member.memory_bytes,
        "memory_budget_bytes": member.memory_budget_bytes,
        "compute_ms": member.compute_ms,
        "disk_ms": member.disk_ms,
        "network_ms": member.network_ms,
    }


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return {
        "model": plan.model,
        "num_layers": plan.num_layers,
        "ring": list(plan.ring),
        "rounds": plan.rounds,
        "hops_per_token": plan.hops_per_token,
        "predicted_ms_per_token": plan.predicted_ms_per_token,
        "period_ms": plan.period_ms,
        "breakdown_ms": {
            "compute": plan.compute_ms,
            "disk": plan.disk_ms,
            "network": plan.network_ms,
        },
        "embedding_device": plan.embedding_device,
        "head_device": plan.head_device,
        "devices": [_device_to_dict(member) for member in plan.devices],
        "left_out": list(plan.left_out),
        "explanation": list(plan.explanation),
        "exact": plan.exact,
        "options": plan.options.to_dict(),
    }


def _first_run_length(layers: Sequence[int]) -> int:
    """Files that omit layers_per_round: a device's first run is a full one."""
    ordered = sorted(int(layer) for layer in layers)
    length = 1 if ordered else 0
    while length < len(ordered) and ordered[length] == ordered[0] + length:
        length += 1
    return length


def _device_from_dict(data: Mapping[str, Any]) -> DevicePlan:
    return DevicePlan(
        id=str(data["id"]),
        layers=tuple(int(layer) for layer in data["layers"]),
        window=int(data["window"]),
        layers_per_round=int(data.get("layers_per_round", _first_run_length(data["layers"]))),
        holds_embedding=bool(data.get("holds_embedding", False)),
        holds_head=bool(data.get("holds_head", False)),
        memory_bytes=int(data.get("memory_bytes", 0)),
        memory_budget_bytes=int(data.get("memory_budget_bytes", 0)),
        compute_ms=float(data.get("compute_ms", 0.0)),
        disk_ms=float(data.get("disk_ms", 0.0)),
        network_ms=float(data.get("network_ms", 0.0)),
    )


def plan_from_dict(data: Mapping[str, Any]) -> Plan:
    members = tuple(_device_from_dict(entry) for entry in data["devices"])
    by_id = {member.id: member for member in members}
    ring = tuple(str(device_id) for device_id in data["ring"])
    # Devices are kept in ring order whatever order the file lists them in.
    ordered = tuple(by_id[device_id] for device_id in ring)
    num_layers = int(data.get("num_layers", sum(len(m.layers) for m in members)))
    breakdown = data.get("breakdown_ms", {})
    last_layer_owner = next((m.id for m in ordered if num_layers - 1 in m.layers), ring[-1])
    plan = Plan(
        model=str(data.get("model", "")),
        num_layers=num_layers,
        ring=ring,
        rounds=int(data["rounds"]),
        hops_per_token=int(data.get("hops_per_token", 0)),
        predicted_ms_per_token=float(data["predicted_ms_per_token"]),
        compute_ms=float(breakdown.get("compute", 0.0)),
        disk_ms=float(breakdown.get("disk", 0.0)),
        network_ms=float(breakdown.get("network", 0.0)),
        embedding_device=str(data.get("embedding_device", ring[0])),
        head_device=str(data.get("head_device", last_layer_owner)),
        devices=ordered,
        left_out=tuple(str(device_id) for device_id in data.get("left_out", [])),
        explanation=tuple(str(line) for line in data.get("explanation", [])),
        exact=bool(data.get("exact", True)),
        options=PlanOptions.from_dict(data.get("options", {})),
    )
    check_plan_structure(plan)
    return plan


def to_json(plan: Plan, indent: int | None = 2) -> str:
    return json.dumps(plan_to_dict(plan), indent=indent)


def from_json(text: str) -> Plan:
    return plan_from_dict(json.loads(text))


def _runs(owners: Sequence[str]) -> list[tuple[str, int]]:
    """Consecutive layers with the same owner, as (owner, length)."""
    runs: list[tuple[str, int]] = []
    for owner in owners:
        if runs and runs[-1][0] == owner:
            runs[-1] = (owner, runs[-1][1] + 1)
        else:
            runs.append((owner, 1))
    return runs


def check_plan_structure(plan: Plan) -> None:
    """Raises ValueError unless every layer is held once, in ring order, with sane windows."""
    if len(set(plan.ring)) != len(plan.ring) or [m.id for m in plan.devices] != list(plan.ring):
        raise ValueError("the ring must list each planned device once, in device order")
    seen = sorted(layer for member in plan.devices for layer in member.layers)
    if seen != list(range(plan.num_layers)):
        raise ValueError("every layer must appear in exactly one device's list")
    for member in plan.devices:
        if not 1 <= member.window <= len(member.layers):
            raise ValueError(f"{member.id}: window {member.window} outside 1..layers held")
    runs = _runs(plan.layer_owner())
    ring_size = len(plan.ring)
    if ring_size > 1:
        for position, (owner, _) in enumerate(runs):
            if owner != plan.ring[position % ring_size]:
                raise ValueError("layers do not walk the ring in order")
        if -(-len(runs) // ring_size) != plan.rounds:
            raise ValueError(f"the layers make {len(runs)} runs, not {plan.rounds} rounds")
        run_lengths: dict[str, list[int]] = {}
        for owner, length in runs:
            run_lengths.setdefault(owner, []).append(length)
        for member in plan.devices:
            lengths = run_lengths[member.id]
            full_rounds = lengths[:-1] if len(lengths) == plan.rounds else lengths
            if any(length != member.layers_per_round for length in full_rounds) or (
                lengths[-1] > member.layers_per_round
            ):
                raise ValueError(f"{member.id}: runs {lengths} break n={member.layers_per_round}")
    if plan.embedding_device != plan.ring[0]:
        raise ValueError("the embedding lives on the ring's first device")
    if plan.head_device != plan.layer_owner()[-1]:
        raise ValueError("the head lives on the device holding the last layer")
