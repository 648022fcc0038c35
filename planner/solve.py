"""`plan_layers`: the optimal plan under the cost model in `cost`, or InfeasiblePlanError.

The objective (README, "Objective"): the shortest pipeline period (the busiest device's
compute + disk per token) among the plans whose time per token for one stream is within
`latency_tolerance` of the fastest plan's; among those, the fastest. The period search
(`_shortest_period`) caps every device's compute + disk per token (`Searcher.capped`) and
bisects over the caps: the least time per token under a cap only falls as the cap rises.

Which numbers of rounds k are searched:
- default latencies and windows independent of runs: k = 1 and k = 2 only. Take any plan with
  k >= 3 and keep its layer counts, windows and roles. If the first device is not also the tail,
  k = 1 (n_i = h_i, tail last) realises them with one hop per device, the fewest possible. If it
  is (it holds embedding and head, and only it works in the last round), k = 2 does, again with
  one hop per device. Every device of a k-round plan sends at least k - 1 >= 1 hops, so neither
  is worse. Brute-force tests over every k check this.
- per-peer latencies or `window_covers_run`: every k a ring of two can have, skipping each k
  (and, per-peer, each ring order) whose lower bound already exceeds the best plan found: the
  least compute + disk time of any plan plus the fewest hops such a plan makes at the cheapest
  latencies.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import replace

from planner import cost, dp
from planner.devices import DeviceProfile, PlanOptions
from planner.explain import explain
from planner.model_profile import ModelProfile
from planner.plan import DevicePlan, InfeasiblePlanError, Plan, check_plan_structure
from planner.search import NONE, ORDER_FREE_FINAL, Assignment, Searcher, better

GIB = 1024**3


def _has_peer_latencies(devices: Sequence[DeviceProfile]) -> bool:
    ids = {device.id for device in devices}
    return any(peer in ids for device in devices for peer in device.peer_latency_ms)


def _with_mean_latencies(devices: Sequence[DeviceProfile]) -> list[DeviceProfile]:
    """Each device's default latency becomes its mean latency to the others (the fallback)."""
    result = []
    for device in devices:
        others = [d.id for d in devices if d.id != device.id]
        mean = sum(device.latency_to_ms(peer) for peer in others) / max(1, len(others))
        result.append(replace(device, latency_ms=mean, peer_latency_ms={}))
    return result


def _work_floor_s(
    model: ModelProfile, devices: Sequence[DeviceProfile], options: PlanOptions
) -> float:
    """The least compute + disk time of any plan: hops free and windows free of runs. With
    those relaxations k = 1 and k = 2 reach every layer split and role (module docstring)."""
    relaxed = Searcher(model, devices, replace(options, window_covers_run=False))
    floor = math.inf
    for index in range(len(devices)):
        lone = relaxed.single_device(index)
        if lone is not None:
            floor = min(floor, lone.objective_s)
    for rounds in range(1, max_multi_device_rounds(model.num_layers, False) + 1):
        stages = relaxed.order_free_stages(rounds, charge_hops=False)
        result = dp.solve_layered(stages, 6, NONE, ORDER_FREE_FINAL, model.num_layers)
        if result is not None:
            floor = min(floor, result.cost)
    return floor


def _cheapest_sends_s(devices: Sequence[DeviceProfile]) -> float:
    """A ring of two or more has at least two senders; each hop costs at least this much."""
    cheapest = sorted(
        min([device.latency_ms] + [device.latency_to_ms(d.id) for d in devices if d is not device])
        for device in devices
    )
    return sum(cheapest[:2]) / cost.MS_PER_S


def _cycle_s(devices: Sequence[DeviceProfile], order: tuple[int, ...]) -> float:
    """Latency of one trip round the ring: a k-round plan makes at least max(1, k - 1)."""
    return (
        sum(
            devices[sender].latency_to_ms(devices[order[(position + 1) % len(order)]].id)
            for position, sender in enumerate(order)
        )
        / cost.MS_PER_S
    )


def max_multi_device_rounds(num_layers: int, every_round_count: bool) -> int:
    """In a ring of two or more every device holds at least k - 1 layers (one per full round)
    and the tail one more, so 2(k - 1) + 1 <= L bounds k."""
    limit = (num_layers - 1) // 2 + 1
    return limit if every_round_count else min(2, limit)


def _search(searcher: Searcher, exact_orders: bool, every_round_count: bool,
            ceiling_s: float = math.inf, work_floor_s: float | None = None) -> Assignment | None:
    """The plan with the least time per token; with `ceiling_s`, candidates whose lower bound
    passes the ceiling are not searched (a result above it means none is below).
    `work_floor_s`: a lower bound on any plan's compute + disk, if known (else computed)."""
    best: Assignment | None = None
    for index in range(len(searcher.devices)):
        candidate = searcher.single_device(index)
        if better(candidate, best):
            best = candidate
    if len(searcher.devices) < 2:
        return best
    model, devices = searcher.model, searcher.devices
    # Only a long search over k repays the two extra DPs this bound costs.
    work_floor = 0.0
    if every_round_count:
        work_floor = (work_floor_s if work_floor_s is not None
                      else _work_floor_s(model, devices, searcher.options))

    def beaten(bound_s: float) -> bool:
        # Pruning by a lower bound is exact: nothing at or above it can improve on `best`.
        limit = min(ceiling_s, best.objective_s if best is not None else math.inf)
        return bool(bound_s > limit + dp.tie_tolerance(limit))

    orders: list[tuple[int, ...]] = []
    if exact_orders:
        most = searcher.most_layers()
        for size in range(2, len(devices) + 1):
            orders.extend(order for order in itertools.permutations(range(len(devices)), size)
                          if sum(most[i] for i in order) >= model.num_layers)
    cycles = {order: _cycle_s(devices, order) for order in orders}
    for rounds in range(1, max_multi_device_rounds(model.num_layers, every_round_count) + 1):
        if beaten(work_floor + (rounds - 1) * _cheapest_sends_s(devices)):
            break
        if exact_orders:
            candidates = [
                searcher.fixed_order(order, rounds)
                for order in orders
                if not beaten(work_floor + max(1, rounds - 1) * cycles[order])
            ]
        else:
            candidates = [searcher.order_free(rounds)]
        for candidate in candidates:
            if candidate is not None and len(candidate.order) == 1:
                # A lone device with k >= 2 was charged hops it does not make; the single-device
                # candidate above already holds its true cost.
                continue
            if better(candidate, best):
                best = candidate
    return best


def _with_cheapest_latencies(devices: Sequence[DeviceProfile]) -> list[DeviceProfile]:
    """Each device's hops at its cheapest latency to any other: no ring costs less."""
    return [replace(device, peer_latency_ms={}, latency_ms=min(
        device.latency_to_ms(other.id) for other in devices if other is not device))
        for device in devices]


def _shortest_period(
    searcher: Searcher, fastest: Assignment, exact_orders: bool, every_round_count: bool
) -> Assignment:
    """The plan with the shortest period whose time per token is within the tolerance of
    `fastest`'s (the fastest plan), and the fastest of those.

    Bisects over the candidate periods (every compute + disk per token a device can have):
    under a cap, the least time per token falls as the cap rises. With per-peer latencies
    each capped search enumerates ring orders, so the bisection runs on a relaxation first
    (every hop at its sender's cheapest latency, order-free, never dearer than a real ring),
    which finds the shortest period that can possibly fit; exact searches go up from there.
    """
    ceiling = fastest.objective_s * (1 + searcher.options.latency_tolerance)
    ceiling += float(dp.tie_tolerance(ceiling))
    caps = [float(cap) for cap in searcher.stage_times() if cap <= fastest.stage_s]
    relaxed = (Searcher(searcher.model, _with_cheapest_latencies(searcher.devices),
                        searcher.options) if exact_orders else searcher)
    # A cap only makes plans dearer: the uncapped floor bounds every capped search too.
    floor = (_work_floor_s(searcher.model, searcher.devices, searcher.options)
             if every_round_count else None)

    def covers(cap: float) -> bool:
        """Whether the devices can hold the model between them under `cap` (no DP needed)."""
        return sum(searcher.capped(cap).most_layers()) >= searcher.model.num_layers

    def within(base: Searcher, cap: float, orders: bool) -> Assignment | None:
        found = _search(base.capped(cap), orders, every_round_count, ceiling, floor)
        return found if found is not None and found.objective_s <= ceiling else None

    low, high = 0, len(caps)
    while low < high:  # the first cap under which the devices can hold the model at all
        middle = (low + high) // 2
        low, high = (low, middle) if covers(caps[middle]) else (middle + 1, high)
    high, found = len(caps), None
    while low < high:  # the first cap the relaxation can meet
        middle = (low + high) // 2
        candidate = within(relaxed, caps[middle], False)
        if candidate is None:
            low = middle + 1
        else:
            high, found = middle, candidate
    if not exact_orders:
        return found or fastest
    for cap in caps[low:]:
        exact = within(searcher, cap, True)
        if exact is not None:
            return exact
    return fastest


def _shortfall(
    model: ModelProfile, devices: Sequence[DeviceProfile], options: PlanOptions
) -> tuple[int, dict[str, int]]:
    """The least total bytes by which budgets must grow for some plan to fit (windows as small
    as allowed), and how that total splits over devices. Hops and order do not matter here."""
    best_total = math.inf
    best_split: dict[str, int] = {}
    lone_need = (
        options.reserve_bytes
        + model.bytes_per_layer
        + cost.kv_cache_bytes(model, options, model.num_layers)
        + cost.role_bytes(model, True, True)
    )
    for device in devices:
        excess = max(0, lone_need - device.memory_budget_bytes)
        if excess < best_total:
            best_total, best_split = excess, {device.id: excess}
    if len(devices) >= 2:
        searcher = Searcher(model, devices, options)
        max_rounds = max_multi_device_rounds(model.num_layers, options.window_covers_run)
        for rounds in range(1, max_rounds + 1):
            total, split = searcher.min_excess_bytes(rounds)
            if total < best_total:
                best_total, best_split = total, split
    return int(best_total), best_split


def _infeasible_error(
    model: ModelProfile, devices: Sequence[DeviceProfile], options: PlanOptions
) -> InfeasiblePlanError:
    total, split = _shortfall(model, devices, options)
    if total <= 0:
        raise RuntimeError("planner found no plan yet no memory shortfall; this is a bug")
    parts = ", ".join(f"{device_id} {excess} bytes" for device_id, excess in split.items())
    kv_all = cost.kv_cache_bytes(model, options, model.num_layers)
    return InfeasiblePlanError(
        f"no plan fits {model.name} on these devices: even streaming weights through the "
        f"smallest windows, they are {total} bytes ({total / GIB:.2f} GiB) short ({parts}). "
        f"The KV cache for {options.context_tokens} tokens alone is {kv_all} bytes and each "
        f"device reserves {options.reserve_bytes} bytes; add memory or devices, or lower "
        "--context or --reserve-bytes.",
        shortfall_bytes=total,
        per_device_shortfall=split,
    )


def _build_plan(
    model: ModelProfile,
    devices: Sequence[DeviceProfile],
    options: PlanOptions,
    chosen: Assignment,
    exact: bool,
) -> Plan:
    owner = chosen.layer_owner(devices)
    windows = {devices[i].id: w for i, w in zip(chosen.order, chosen.windows, strict=True)}
    evaluated = cost.evaluate_candidate(model, devices, options, owner, windows)
    if not evaluated.fits:
        raise RuntimeError("planner chose a plan that does not fit; this is a bug")
    if exact and not math.isclose(
        evaluated.total_s, chosen.objective_s, rel_tol=1e-9, abs_tol=1e-12
    ):
        raise RuntimeError("planner's DP and cost model disagree; this is a bug")
    members = []
    for position, device_index in enumerate(chosen.order):
        device = devices[device_index]
        device_cost = evaluated.devices[device.id]
        members.append(
            DevicePlan(
                id=device.id,
                layers=tuple(layer for layer, held_by in enumerate(owner) if held_by == device.id),
                window=chosen.windows[position],
                layers_per_round=chosen.run_lengths[position],
                holds_embedding=owner[0] == device.id,
                holds_head=owner[-1] == device.id,
                memory_bytes=device_cost.memory_bytes,
                memory_budget_bytes=device.memory_budget_bytes,
                compute_ms=device_cost.compute_s * cost.MS_PER_S,
                disk_ms=device_cost.disk_s * cost.MS_PER_S,
                network_ms=device_cost.network_s * cost.MS_PER_S,
            )
        )
    ring = tuple(member.id for member in members)
    plan = Plan(
        model=model.name,
        num_layers=model.num_layers,
        ring=ring,
        rounds=chosen.rounds,
        hops_per_token=evaluated.hops,
        predicted_ms_per_token=evaluated.total_s * cost.MS_PER_S,
        compute_ms=sum(member.compute_ms for member in members),
        disk_ms=sum(member.disk_ms for member in members),
        network_ms=sum(member.network_ms for member in members),
        embedding_device=owner[0],
        head_device=owner[-1],
        devices=tuple(members),
        left_out=tuple(device.id for device in devices if device.id not in ring),
        explanation=(),
        exact=exact,
        options=options,
    )
    check_plan_structure(plan)
    return replace(plan, explanation=tuple(explain(plan, model, devices, options)))


def plan_layers(
    model: ModelProfile,
    devices: Sequence[DeviceProfile],
    options: PlanOptions | None = None,
) -> Plan:
    """The plan with the shortest pipeline period among those within `latency_tolerance` of
    the least predicted decode time per token, and the fastest of those (README, "Objective").

    Raises InfeasiblePlanError, naming the shortfall in bytes, when nothing fits.
    """
    options = options or PlanOptions()
    if not devices:
        raise ValueError("plan_layers needs at least one device")
    if len({device.id for device in devices}) != len(devices):
        raise ValueError("device ids must be unique")
    per_peer = _has_peer_latencies(devices)
    exact = not per_peer or len(devices) <= options.max_exact_order_devices
    search_devices = list(devices) if exact else _with_mean_latencies(devices)
    searcher = Searcher(model, search_devices, options)
    exact_orders = per_peer and exact
    every_round_count = options.window_covers_run or exact_orders
    chosen = _search(searcher, exact_orders, every_round_count)
    if chosen is None:
        raise _infeasible_error(model, devices, options)
    if options.latency_tolerance > 0 and len(devices) > 1:
        chosen = _shortest_period(searcher, chosen, exact_orders, every_round_count)
    return _build_plan(model, devices, options, chosen, exact)
