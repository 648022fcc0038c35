"""Property-based tests over random models and devices (hypothesis)."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner import (
    DeviceProfile,
    InfeasiblePlanError,
    ModelProfile,
    Plan,
    PlanOptions,
    from_json,
    plan_layers,
    to_json,
    uniform_profile,
)
from tests.planner.reference import device_memory, recompute_ms

# PLANNER_EXAMPLES=2000 uv run pytest tests/planner/test_properties.py for a deeper search.
EXAMPLES = int(os.environ.get("PLANNER_EXAMPLES", "60"))
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def models(draw: st.DrawFn, max_layers: int = 48) -> ModelProfile:
    return uniform_profile(
        name="hypothesis",
        num_layers=draw(st.integers(1, max_layers)),
        bytes_per_layer=draw(st.integers(1, 100)),
        flops_per_token_per_layer=draw(st.floats(1.0, 1e4)),
        kv_bytes_per_token_per_layer=draw(st.integers(0, 4)),
        embedding_bytes=draw(st.integers(0, 300)),
        head_bytes=draw(st.integers(0, 300)),
        head_flops_per_token=draw(st.floats(0.0, 1e4)),
        tied_embeddings=draw(st.booleans()),
    )


@st.composite
def fleets(draw: st.DrawFn, max_devices: int = 6, per_peer: bool = False) -> list[DeviceProfile]:
    count = draw(st.integers(1, max_devices))
    ids = [f"d{index}" for index in range(count)]
    devices = []
    for device_id in ids:
        peers = (
            draw(st.dictionaries(st.sampled_from(ids), st.floats(0.0, 50.0), max_size=count))
            if per_peer
            else {}
        )
        peers.pop(device_id, None)
        devices.append(
            DeviceProfile(
                id=device_id,
                memory_budget_bytes=draw(st.integers(0, 3000)),
                flops=draw(st.floats(1.0, 100.0)),
                disk_read_bytes_per_s=draw(st.floats(0.5, 50.0)),
                latency_ms=draw(st.floats(0.0, 50.0)),
                peer_latency_ms=peers,
            )
        )
    return devices


options_strategy = st.builds(
    PlanOptions,
    context_tokens=st.integers(0, 8),
    reserve_bytes=st.integers(0, 100),
    window_covers_run=st.booleans(),
    latency_tolerance=st.sampled_from([0.0, 0.1, 0.5]),
)


def owners(plan: Plan) -> list[str]:
    owner = [""] * plan.num_layers
    for member in plan.devices:
        for layer in member.layers:
            assert owner[layer] == "", f"layer {layer} held twice"
            owner[layer] = member.id
    assert all(owner), "a layer is held by nobody"
    return owner


def assert_plan_properties(
    model: ModelProfile, devices: list[DeviceProfile], options: PlanOptions, plan: Plan
) -> None:
    by_id = {device.id: device for device in devices}
    owner = owners(plan)
    # Ring order: consecutive runs of layers visit the ring's devices cyclically.
    runs = [
        device for index, device in enumerate(owner) if index == 0 or owner[index - 1] != device
    ]
    assert runs == [plan.ring[i % len(plan.ring)] for i in range(len(runs))]
    if len(plan.ring) > 1:
        per_round = sum(member.layers_per_round for member in plan.devices)
        assert plan.rounds == math.ceil(model.num_layers / per_round)
    assert set(plan.ring) | set(plan.left_out) == set(by_id)
    assert plan.embedding_device == owner[0] and plan.head_device == owner[-1]
    for member in plan.devices:
        held = len(member.layers)
        assert 1 <= member.window <= held
        if options.window_covers_run:
            assert member.layers_per_round <= member.window
        memory = device_memory(
            model, options, held, member.window, owner[0] == member.id, owner[-1] == member.id
        )
        assert memory == member.memory_bytes <= by_id[member.id].memory_budget_bytes
    assert plan.hops_per_token == sum(
        owner[i] != owner[(i + 1) % len(owner)] for i in range(len(owner))
    )
    assert recompute_ms(model, devices, options, plan) == pytest.approx(
        plan.predicted_ms_per_token, rel=1e-9, abs=1e-9
    )
    assert plan.compute_ms + plan.disk_ms + plan.network_ms == pytest.approx(
        plan.predicted_ms_per_token, rel=1e-9, abs=1e-9
    )
    assert from_json(to_json(plan)) == plan
    # The objective's promises: never more than the tolerance slower for one stream than the
    # fastest plan, and never a longer period.
    fastest = plan_layers(model, devices, replace(options, latency_tolerance=0.0))
    ceiling = fastest.predicted_ms_per_token * (1 + options.latency_tolerance)
    assert plan.predicted_ms_per_token <= ceiling * (1 + 1e-9) + 1e-9
    assert plan.period_ms <= fastest.period_ms * (1 + 1e-9) + 1e-9


@SETTINGS
@given(model=models(), devices=fleets(), options=options_strategy)
def test_plans_are_valid_and_costed_exactly(
    model: ModelProfile, devices: list[DeviceProfile], options: PlanOptions
) -> None:
    try:
        plan = plan_layers(model, devices, options)
    except InfeasiblePlanError as error:
        assert error.shortfall_bytes > 0
        assert f"{error.shortfall_bytes} bytes" in str(error)
        return
    assert_plan_properties(model, devices, options, plan)


@settings(
    max_examples=max(1, EXAMPLES // 2), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    model=models(max_layers=14),
    devices=fleets(max_devices=4, per_peer=True),
    options=options_strategy,
)
def test_per_peer_plans_are_valid_and_costed_exactly(
    model: ModelProfile, devices: list[DeviceProfile], options: PlanOptions
) -> None:
    try:
        plan = plan_layers(model, devices, options)
    except InfeasiblePlanError:
        return
    assert plan.exact
    assert_plan_properties(model, devices, options, plan)


def cost_or_inf(model: ModelProfile, devices: list[DeviceProfile], options: PlanOptions) -> float:
    """The fastest plan's time per token (tolerance 0: the fastest plan is what only gets
    better with more devices or fewer constraints)."""
    try:
        return plan_layers(model, devices, replace(options, latency_tolerance=0.0)
                           ).predicted_ms_per_token
    except InfeasiblePlanError:
        return math.inf


@SETTINGS
@given(
    model=models(),
    devices=fleets(max_devices=5),
    extra=fleets(max_devices=1),
    options=options_strategy,
)
def test_more_devices_or_fewer_constraints_never_cost_more(
    model: ModelProfile,
    devices: list[DeviceProfile],
    extra: list[DeviceProfile],
    options: PlanOptions,
) -> None:
    """Metamorphic checks of optimality on instances too big for brute force."""
    base = cost_or_inf(model, devices, options)
    newcomer = DeviceProfile(
        "newcomer",
        extra[0].memory_budget_bytes,
        extra[0].flops,
        extra[0].disk_read_bytes_per_s,
        extra[0].latency_ms,
    )
    tolerance = 1e-9 * (1 if math.isinf(base) else max(1.0, base))
    assert cost_or_inf(model, [*devices, newcomer], options) <= base + tolerance
    if not math.isinf(base):
        # A user who adds a device: one stream is never more than the tolerance slower than
        # the fastest plan without it.
        grown = plan_layers(model, [*devices, newcomer], options).predicted_ms_per_token
        assert grown <= base * (1 + options.latency_tolerance) + tolerance
    if options.window_covers_run:
        relaxed = PlanOptions(options.context_tokens, options.reserve_bytes, False)
        assert cost_or_inf(model, devices, relaxed) <= base + tolerance
    if options.context_tokens > 0:
        shorter = PlanOptions(
            options.context_tokens - 1, options.reserve_bytes, options.window_covers_run
        )
        assert cost_or_inf(model, devices, shorter) <= base + tolerance
