"""An independent re-implementation of the cost model, and brute force over every plan.

Nothing here imports the planner's solver or cost code: layouts come from dealing layers out
round by round, hops from walking the layers, memory and time from the README's formulas.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from planner import DeviceProfile, ModelProfile, Plan, PlanOptions


def deal_layers(order: Sequence[str], runs: Sequence[int], num_layers: int) -> list[str] | None:
    """Owner of every layer when each round gives order[i] the next runs[i] layers, cut at L.
    None when some device of the order would get no layer at all."""
    owner: list[str] = []
    while len(owner) < num_layers:
        for device_id, run in zip(order, runs, strict=True):
            take = min(run, num_layers - len(owner))
            owner.extend([device_id] * take)
    if set(owner) != set(order):
        return None
    return owner


def sender_latency_ms(device: DeviceProfile, receiver: str) -> float:
    return device.peer_latency_ms.get(receiver, device.latency_ms)


def network_ms(devices: dict[str, DeviceProfile], owner: Sequence[str]) -> dict[str, float]:
    sent = dict.fromkeys(owner, 0.0)
    for layer, sender in enumerate(owner):
        receiver = owner[(layer + 1) % len(owner)]
        if receiver != sender:
            sent[sender] += sender_latency_ms(devices[sender], receiver)
    return sent


def device_memory(
    model: ModelProfile,
    options: PlanOptions,
    held: int,
    window: int,
    first: bool,
    last: bool,
) -> int:
    memory = options.reserve_bytes + window * max(model.layer_bytes)
    memory += held * model.cache_bytes_per_layer(options.context_tokens)
    if first:
        memory += model.embedding_bytes
    if last:
        memory += model.head_bytes + (
            model.embedding_bytes if model.tied_embeddings and not first else 0
        )
    return memory


def device_work_ms(
    model: ModelProfile, device: DeviceProfile, held: int, window: int, last: bool
) -> float:
    flops = held * max(model.layer_flops_per_token) + (model.head_flops_per_token if last else 0)
    # The engine pins window - 2 layers and streams the rest through two slots.
    reloaded = 0 if window >= held else held - max(window - 2, 0)
    disk_bytes = reloaded * max(model.layer_bytes)
    return 1000.0 * (flops / device.flops + disk_bytes / device.disk_read_bytes_per_s)


def recompute_ms(
    model: ModelProfile, devices: Sequence[DeviceProfile], options: PlanOptions, plan: Plan
) -> float:
    """The predicted time of a plan, from its layer lists and windows alone."""
    by_id = {device.id: device for device in devices}
    owner = [""] * model.num_layers
    for member in plan.devices:
        for layer in member.layers:
            owner[layer] = member.id
    sent = network_ms(by_id, owner)
    total = 0.0
    for member in plan.devices:
        last = owner[-1] == member.id
        total += device_work_ms(model, by_id[member.id], len(member.layers), member.window, last)
        total += sent[member.id]
    return total


def recompute_period_ms(
    model: ModelProfile, devices: Sequence[DeviceProfile], plan: Plan
) -> float:
    """A plan's period: its busiest device's compute + disk per token."""
    by_id = {device.id: device for device in devices}
    last_owner = next(m.id for m in plan.devices if model.num_layers - 1 in m.layers)
    return max(device_work_ms(model, by_id[m.id], len(m.layers), m.window, m.id == last_owner)
               for m in plan.devices)


def slack(value: float) -> float:
    return 1e-12 + 1e-9 * abs(value)


@dataclass(frozen=True)
class BruteForceResult:
    """The objective's answer: among plans within `latency_tolerance` of the fastest
    (`fastest_ms`), the shortest period (`period_ms`), and the fastest of those (`best_ms`)."""

    best_ms: float  # inf when nothing fits
    least_shortfall_bytes: int
    fastest_ms: float = math.inf
    period_ms: float = math.inf


def choose(plans: list[tuple[float, float]], tolerance: float) -> tuple[float, float, float]:
    """(best, fastest, period) ms from every plan's (time per token, period)."""
    fastest = min(time for time, _ in plans)
    ceiling = fastest * (1 + tolerance)
    ceiling += slack(ceiling)
    period = min(p for time, p in plans if time <= ceiling)
    best = min(time for time, p in plans if time <= ceiling and p <= period + slack(period))
    return best, fastest, period


def brute_force(
    model: ModelProfile,
    devices: Sequence[DeviceProfile],
    options: PlanOptions,
    joint_windows: bool = False,
) -> BruteForceResult:
    """Every ring (subset and order), every per-round run vector, every window.

    Run vectors: runs[i] >= 1 with every device of the ring getting a layer; the last device
    of the ring may have any run up to L (its last run is cut at L). With `joint_windows` every
    combination of windows is tried together; otherwise each device's window is minimised on
    its own, which is the same minimum because the cost is a sum of per-device terms.
    """
    by_id = {device.id: device for device in devices}
    num_layers = model.num_layers
    plans: list[tuple[float, float]] = []  # (time per token, period) of every plan that fits
    least_shortfall = math.inf

    @cache
    def device_options(
        device_id: str, held: int, first: bool, last: bool, run: int
    ) -> tuple[tuple[int, float], ...]:
        """(window, work ms) for every window that fits."""
        smallest = run if options.window_covers_run else 1
        fitting = []
        for window in range(1, held + 1):
            memory = device_memory(model, options, held, window, first, last)
            if window >= smallest and memory <= by_id[device_id].memory_budget_bytes:
                fitting.append(
                    (window, device_work_ms(model, by_id[device_id], held, window, last))
                )
        return tuple(fitting)

    @cache
    def device_shortfall(device_id: str, held: int, first: bool, last: bool, run: int) -> int:
        smallest = min(held, run) if options.window_covers_run else 1
        memory = device_memory(model, options, held, smallest, first, last)
        return max(0, memory - by_id[device_id].memory_budget_bytes)

    for size in range(1, len(devices) + 1):
        for order in itertools.permutations([device.id for device in devices], size):
            lead_runs = itertools.product(range(1, num_layers + 1), repeat=size - 1)
            for lead in lead_runs:
                if sum(lead) >= num_layers:
                    continue
                for last_run in range(1, num_layers + 1):
                    runs = (*lead, last_run)
                    owner = deal_layers(order, runs, num_layers)
                    if owner is None:
                        continue
                    held = {device_id: owner.count(device_id) for device_id in order}
                    roles = {d: (owner[0] == d, owner[-1] == d) for d in order}
                    shortfall = sum(
                        device_shortfall(d, held[d], *roles[d], runs[i])
                        for i, d in enumerate(order)
                    )
                    least_shortfall = min(least_shortfall, shortfall)
                    choices = [
                        device_options(d, held[d], *roles[d], runs[i]) for i, d in enumerate(order)
                    ]
                    if any(not choice for choice in choices):
                        continue
                    sent = network_ms(by_id, owner)
                    fixed = sum(sent.values())
                    if joint_windows:
                        for combo in itertools.product(*choices):
                            works = [work for _, work in combo]
                            plans.append((fixed + sum(works), max(works)))
                    else:
                        works = [min(w for _, w in c) for c in choices]
                        plans.append((fixed + sum(works), max(works)))
    if not plans:
        return BruteForceResult(best_ms=math.inf, least_shortfall_bytes=int(least_shortfall))
    best, fastest, period = choose(plans, options.latency_tolerance)
    return BruteForceResult(best, int(least_shortfall), fastest, period)
