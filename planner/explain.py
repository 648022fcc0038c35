"""Short human sentences saying why a plan looks the way it does."""

from __future__ import annotations

from collections.abc import Sequence

from planner import cost
from planner.devices import DeviceProfile, PlanOptions
from planner.model_profile import ModelProfile
from planner.plan import DevicePlan, Plan

GIB = 1024**3


def layer_ranges(layers: Sequence[int]) -> str:
    """[0, 1, 2, 6, 7] -> '0-2, 6-7'."""
    spans: list[list[int]] = []
    for layer in layers:
        if spans and spans[-1][1] == layer - 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def human_bytes(size: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"


def count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _member_sentence(member: DevicePlan, model: ModelProfile, options: PlanOptions) -> str:
    held = len(member.layers)
    roles = [
        role
        for role, present in (
            ("the embedding", member.holds_embedding),
            ("the head", member.holds_head),
        )
        if present
    ]
    extras = f" plus {' and '.join(roles)}" if roles else ""
    where = f"{member.id} holds {count(held, 'layer')} ({layer_ranges(member.layers)}){extras}"
    if member.streamed_layers == 0:
        return (
            f"{where}, all resident: {human_bytes(member.memory_bytes)} of its "
            f"{human_bytes(member.memory_budget_bytes)} budget; {member.total_ms:.2f} ms per token."
        )
    kv = human_bytes(cost.kv_cache_bytes(model, options, held))
    role = human_bytes(cost.role_bytes(model, member.holds_embedding, member.holds_head))
    budget = human_bytes(member.memory_budget_bytes)
    reserve = human_bytes(options.reserve_bytes)
    return (
        f"{where}; it streams {member.streamed_layers} of them from disk each token "
        f"(+{member.disk_ms:.1f} ms) because its {budget} budget, after {kv} of KV cache for "
        f"{options.context_tokens} tokens, the {reserve} reserve and {role} of embedding/head, "
        f"keeps only {count(member.window, 'layer')} resident."
    )


def _left_out_sentence(
    device: DeviceProfile,
    ring_devices: Sequence[DeviceProfile],
    model: ModelProfile,
    options: PlanOptions,
) -> str:
    if cost.largest_window(model, device, options, 1, False, False) < 1:
        return (
            f"{device.id} is left out: its {human_bytes(device.memory_budget_bytes)} budget "
            "cannot hold one layer with its KV cache and the reserve."
        )
    layer_ms = cost.layer_time_s(model, device) * cost.MS_PER_S
    best_ms = min(cost.layer_time_s(model, d) for d in ring_devices) * cost.MS_PER_S
    return (
        f"{device.id} is left out: no plan using it has a shorter period within "
        f"{options.latency_tolerance:.0%} of the fastest plan's time per token (a layer takes "
        f"it {layer_ms:.3f} ms vs {best_ms:.3f} ms at best in the ring, and each hop it sends "
        f"costs {device.latency_ms:.2f} ms)."
    )


def _rounds_reason(plan: Plan, options: PlanOptions) -> str:
    if options.window_covers_run:
        return (
            "each window must hold a whole per-round run (window_covers_run), so short windows "
            "force short runs; every extra round adds hops"
        )
    if plan.embedding_device == plan.head_device:
        return (
            f"{plan.head_device} runs both the first and the last layers, so the embedding and "
            "the head share its memory, at no extra hop"
        )
    return "per-peer latencies make this ring's partial last round the cheapest"


def explain(
    plan: Plan, model: ModelProfile, devices: Sequence[DeviceProfile], options: PlanOptions
) -> list[str]:
    ring_text = " -> ".join(plan.ring)
    lines = [
        f"Ring {ring_text}, {plan.rounds} round(s), {plan.hops_per_token} hop(s) per token: "
        f"{plan.predicted_ms_per_token:.2f} ms per token = {plan.compute_ms:.2f} compute + "
        f"{plan.disk_ms:.2f} disk + {plan.network_ms:.2f} network."
    ]
    if len(plan.ring) > 1:
        lines.append(
            f"Pipeline period {plan.period_ms:.2f} ms (the busiest device's compute + disk per "
            "token): prompt chunks and concurrent requests overlap across the devices, one "
            f"leaving every period; one stream may be up to {options.latency_tolerance:.0%} "
            "slower than in the fastest plan for a shorter period."
        )
    lines += [_member_sentence(member, model, options) for member in plan.devices]
    if plan.rounds > 1 and len(plan.ring) > 1:
        lines.append(f"{plan.rounds} rounds because {_rounds_reason(plan, options)}.")
    by_id = {device.id: device for device in devices}
    ring_devices = [by_id[device_id] for device_id in plan.ring]
    lines += [
        _left_out_sentence(by_id[device_id], ring_devices, model, options)
        for device_id in plan.left_out
    ]
    if len(plan.ring) == 1 and plan.left_out:
        lines.append("One device holds the whole model: the hops another device would add cost "
                     "one stream more than the tolerance.")
    if not plan.exact:
        lines.append(
            f"Per-peer latencies with more than {options.max_exact_order_devices} devices: ring "
            "order was chosen with each device's mean latency, so this plan is not proven optimal."
        )
    return lines
