"""The cost model: predicted decode time per token of a candidate assignment.

For each device i holding h_i layers with window w_i (layers resident at once):
    compute_i = h_i * F_layer / flops_i  (+ F_head / flops_i on the device holding the head)
    disk_i    = streamed(h_i, w_i) * B_layer / disk_read_bytes_per_s_i
    network_i = sum over hops that i sends of latency(i -> receiver)
    memory_i  = reserve + w_i * B_layer + h_i * C_layer(context) + embedding/head bytes held
              <= memory_budget_bytes_i
where streamed(h, w) = 0 if w >= h, else h - max(w - 2, 0): the engine (dnet/weights.py)
pins w - 2 layers and streams the rest through two slots, the one computing and the one being
prefetched, so a device short of memory reloads h - w + 2 layers per token (all h when w <= 2).
The time per token is the sum over devices of compute + disk + network. A hop is every
change of device between consecutive layers, plus the tail feeding the head for the next token.
`evaluate_candidate` computes this from explicit layer lists by walking the layers; the solver
uses the same per-device formulas in vectorised form (`tables`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from planner.devices import DeviceProfile, PlanOptions
from planner.model_profile import ModelProfile

MS_PER_S = 1000.0


def layer_time_s(model: ModelProfile, device: DeviceProfile) -> float:
    return model.flops_per_token_per_layer / device.flops


def head_time_s(model: ModelProfile, device: DeviceProfile) -> float:
    return model.head_flops_per_token / device.flops


def kv_cache_bytes(model: ModelProfile, options: PlanOptions, layers_held: int) -> int:
    # KV stays resident for every held layer; only weights stream.
    return layers_held * model.cache_bytes_per_layer(options.context_tokens)


def role_bytes(model: ModelProfile, holds_embedding: bool, holds_head: bool) -> int:
    """Embedding and head weights a device holds besides its layers.

    A tied head reuses the embedding matrix, so a tail that is not also the ring head keeps its
    own copy of the embedding; one device holding both counts it once.
    """
    total = model.embedding_bytes if holds_embedding else 0
    if holds_head:
        total += model.head_bytes
        if model.tied_embeddings and not holds_embedding:
            total += model.embedding_bytes
    return total


def fixed_bytes(
    model: ModelProfile,
    options: PlanOptions,
    layers_held: int,
    holds_embedding: bool,
    holds_head: bool,
) -> int:
    """Memory a device needs before any layer weights: reserve, KV cache, embedding/head."""
    return (
        options.reserve_bytes
        + kv_cache_bytes(model, options, layers_held)
        + role_bytes(model, holds_embedding, holds_head)
    )


def memory_bytes(
    model: ModelProfile,
    options: PlanOptions,
    layers_held: int,
    window: int,
    holds_embedding: bool,
    holds_head: bool,
) -> int:
    fixed = fixed_bytes(model, options, layers_held, holds_embedding, holds_head)
    return fixed + window * model.bytes_per_layer


def largest_window(
    model: ModelProfile,
    device: DeviceProfile,
    options: PlanOptions,
    layers_held: int,
    holds_embedding: bool,
    holds_head: bool,
) -> int:
    """The most layers that fit resident (capped at those held); below 1 means nothing fits."""
    free = device.memory_budget_bytes - fixed_bytes(
        model, options, layers_held, holds_embedding, holds_head
    )
    if model.bytes_per_layer == 0:
        return layers_held if free >= 0 else 0
    return min(layers_held, free // model.bytes_per_layer)


STREAMING_SLOTS = 2  # layers in flight when streaming: the one computing, the one loading


def streamed_layers(layers_held: int | np.ndarray, window: int | np.ndarray) -> np.ndarray:
    """Layers a device reloads from disk per token; works on ints and NumPy arrays alike."""
    pinned = np.maximum(window - STREAMING_SLOTS, 0)
    return np.where(window >= layers_held, 0, layers_held - pinned)


def disk_time_s(model: ModelProfile, device: DeviceProfile, layers_held: int, window: int) -> float:
    streamed = int(streamed_layers(layers_held, window))
    return streamed * model.bytes_per_layer / device.disk_read_bytes_per_s


@dataclass(frozen=True)
class DeviceCost:
    compute_s: float
    disk_s: float
    network_s: float
    memory_bytes: int
    fits: bool

    @property
    def total_s(self) -> float:
        return self.compute_s + self.disk_s + self.network_s


@dataclass(frozen=True)
class CandidateCost:
    devices: dict[str, DeviceCost]
    hops: int

    @property
    def fits(self) -> bool:
        return all(cost.fits for cost in self.devices.values())

    @property
    def total_s(self) -> float:
        return sum(cost.total_s for cost in self.devices.values())


def evaluate_candidate(
    model: ModelProfile,
    devices: Sequence[DeviceProfile],
    options: PlanOptions,
    layer_owner: Sequence[str],
    windows: Mapping[str, int],
) -> CandidateCost:
    """Cost of one candidate: `layer_owner[l]` holds layer l, `windows[id]` its window.

    The embedding goes with layer 0's owner and the head with the last layer's owner.
    """
    if len(layer_owner) != model.num_layers:
        raise ValueError("layer_owner must name an owner for every layer")
    by_id = {device.id: device for device in devices}
    held: dict[str, int] = {}
    for owner in layer_owner:
        held[owner] = held.get(owner, 0) + 1
    network_s = dict.fromkeys(held, 0.0)
    hops = 0
    for layer, owner in enumerate(layer_owner):
        receiver = layer_owner[(layer + 1) % len(layer_owner)]
        if receiver != owner:
            hops += 1
            network_s[owner] += by_id[owner].latency_to_ms(receiver) / MS_PER_S
    costs: dict[str, DeviceCost] = {}
    for owner, layers_held in held.items():
        device = by_id[owner]
        window = windows[owner]
        holds_embedding = layer_owner[0] == owner
        holds_head = layer_owner[-1] == owner
        compute_s = layers_held * layer_time_s(model, device)
        if holds_head:
            compute_s += head_time_s(model, device)
        used = memory_bytes(model, options, layers_held, window, holds_embedding, holds_head)
        costs[owner] = DeviceCost(
            compute_s=compute_s,
            disk_s=disk_time_s(model, device, layers_held, window),
            network_s=network_s[owner],
            memory_bytes=used,
            fits=1 <= window <= layers_held and used <= device.memory_budget_bytes,
        )
    return CandidateCost(devices=costs, hops=hops)
