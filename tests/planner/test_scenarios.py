"""The seed's scenarios and the issue's edge cases, on realistic model sizes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dnet.model_facts import profile_from_config
from planner import (
    DeviceProfile,
    InfeasiblePlanError,
    Plan,
    PlanOptions,
    check_plan_structure,
    from_json,
    plan_layers,
    to_json,
    uniform_profile,
)
from planner.plan import DevicePlan

GIB = 1024**3
QWEN3_4B = {
    "model_type": "qwen3",
    "num_hidden_layers": 36,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}
QWEN3_32B = {
    **QWEN3_4B,
    "num_hidden_layers": 64,
    "hidden_size": 5120,
    "intermediate_size": 25600,
    "num_attention_heads": 64,
    "tie_word_embeddings": False,
}


def mac(device_id: str, memory: int, flops: float = 2e12, latency_ms: float = 2.0) -> DeviceProfile:
    return DeviceProfile(device_id, memory, flops, 3e9, latency_ms)


def held(plan: Plan) -> list[int]:
    return [len(member.layers) for member in plan.devices]


def test_published_sizes_from_config_alone() -> None:
    small = profile_from_config(QWEN3_4B, name="Qwen3-4B")
    large = profile_from_config(QWEN3_32B, name="Qwen3-32B")
    # Qwen3-4B has 4.0B parameters and Qwen3-32B 32.8B (model cards), at 2 bytes each.
    assert small.total_bytes / 2 == pytest.approx(4.02e9, rel=0.01)
    assert large.total_bytes / 2 == pytest.approx(32.8e9, rel=0.01)
    assert small.cache_bytes_per_layer(1) == 2 * 8 * 128 * 2
    assert small.tied_embeddings and not large.tied_embeddings


def stage_ms(plan: Plan) -> list[float]:
    return [member.compute_ms + member.disk_ms for member in plan.devices]


def test_qwen3_4b_split_over_two_devices_that_each_hold_half() -> None:
    model = profile_from_config(QWEN3_4B, name="Qwen3-4B")
    plan = plan_layers(model, [mac("mac-a", 6 * GIB), mac("mac-b", 6 * GIB)])
    assert plan.ring == ("mac-a", "mac-b")
    assert plan.rounds == 1 and plan.disk_ms == 0
    assert all(member.window == len(member.layers) for member in plan.devices)
    assert plan.embedding_device == "mac-a" and plan.head_device == "mac-b"
    # Equal stages, not equal layer counts: the tail also runs the 152k-token head, worth about
    # two layers, so it holds two layers fewer and the pipeline's period is as short as it gets.
    assert held(plan) == [20, 16] and plan.devices[0].layers == tuple(range(20))
    layer_ms = plan.devices[0].compute_ms / 20
    assert abs(stage_ms(plan)[0] - stage_ms(plan)[1]) <= layer_ms
    # Minimising one stream's time alone (the objective before periods), counts are even.
    fastest = plan_layers(model, [mac("mac-a", 6 * GIB), mac("mac-b", 6 * GIB)],
                          PlanOptions(latency_tolerance=0.0))
    assert held(fastest) == [18, 18]


def test_qwen3_4b_stays_on_one_device_when_hops_cost_more_than_the_tolerance() -> None:
    """Two 2 ms hops on a 4 ms token: a second device would make one stream twice as slow."""
    model = profile_from_config(QWEN3_4B, name="Qwen3-4B")
    plan = plan_layers(model, [mac("mac-a", 16 * GIB), mac("mac-b", 16 * GIB)])
    assert plan.ring == ("mac-a",) and plan.left_out == ("mac-b",)
    assert plan.hops_per_token == 0 and plan.network_ms == 0
    assert any("left out" in line for line in plan.explanation)


def test_a_second_equal_device_on_a_fast_link_is_used() -> None:
    """Issue 15: two equal nodes, a model either holds, 0.1 ms hops: both hold layers, so prompt
    chunks and concurrent requests overlap on two stages, for one stream 5% slower at most."""
    model = profile_from_config(QWEN3_4B, name="Qwen3-4B")
    devices = [mac("mac-a", 16 * GIB, latency_ms=0.1), mac("mac-b", 16 * GIB, latency_ms=0.1)]
    plan = plan_layers(model, devices)
    alone = plan_layers(model, devices, PlanOptions(latency_tolerance=0.0))
    assert alone.ring == ("mac-a",)  # one stream alone would rather skip the hops
    assert plan.ring == ("mac-a", "mac-b") and plan.left_out == ()
    assert plan.period_ms < 0.6 * alone.period_ms
    assert plan.predicted_ms_per_token <= 1.1 * alone.predicted_ms_per_token
    assert any("period" in line for line in plan.explanation)


def test_a_slower_device_takes_a_share_in_proportion_to_its_speed() -> None:
    model = uniform_profile(
        name="m",
        num_layers=30,
        bytes_per_layer=100,
        flops_per_token_per_layer=1e9,
        kv_bytes_per_token_per_layer=0,
    )
    fast = DeviceProfile("fast", 10_000, 2e12, 1e3, 0.01)
    slow = DeviceProfile("slow", 10_000, 1e12, 1e3, 0.01)
    # Every layer the slow device takes costs one stream 0.5 ms more than on the fast one: the
    # tolerance (10% of the fastest plan's 15 ms) buys it 2 layers...
    plan = plan_layers(model, [fast, slow], PlanOptions(0, 0))
    assert dict(zip(plan.ring, held(plan), strict=True)) == {"fast": 28, "slow": 2}
    assert plan.predicted_ms_per_token <= 16.5 and plan.period_ms == pytest.approx(14.0)
    # ...and a tolerance of 50% the split by speed, where both stages take 10 ms.
    even = plan_layers(model, [fast, slow], PlanOptions(0, 0, latency_tolerance=0.5))
    assert dict(zip(even.ring, held(even), strict=True)) == {"fast": 20, "slow": 10}
    assert stage_ms(even) == [pytest.approx(10.0), pytest.approx(10.0)]


def test_qwen3_32b_on_two_9gb_devices_streams_instead_of_failing() -> None:
    model = profile_from_config(QWEN3_32B, name="Qwen3-32B")
    devices = [mac("mac-a", 9 * 10**9), mac("mac-b", 9 * 10**9)]
    plan = plan_layers(model, devices)
    assert sorted(plan.ring) == ["mac-a", "mac-b"]
    assert sum(held(plan)) == 64
    for member in plan.devices:
        assert 1 <= member.window <= len(member.layers)
        assert member.memory_bytes <= member.memory_budget_bytes
    # Neither device can hold half the model, so at least one streams.
    assert any(member.window < len(member.layers) for member in plan.devices)
    assert plan.disk_ms > 0
    assert any("streams" in line for line in plan.explanation)

    rounds_plan = plan_layers(model, devices, PlanOptions(window_covers_run=True))
    assert rounds_plan.rounds > 1
    for member in rounds_plan.devices:
        assert member.layers_per_round <= member.window < len(member.layers)


def test_seed_layout_is_a_valid_two_round_plan() -> None:
    """The seed README's example: 0-17 + 36-53 on one device, 18-35 + 54-63 on the other."""
    first = tuple(range(18)) + tuple(range(36, 54))
    second = tuple(range(18, 36)) + tuple(range(54, 64))
    plan = from_json(
        to_json(
            Plan(
                model="Qwen3-32B",
                num_layers=64,
                ring=("d1", "d2"),
                rounds=2,
                hops_per_token=4,
                predicted_ms_per_token=1.0,
                compute_ms=1.0,
                disk_ms=0.0,
                network_ms=0.0,
                embedding_device="d1",
                head_device="d2",
                devices=(
                    DevicePlan("d1", first, 18, 18, True, False, 0, 0, 0.5, 0, 0),
                    DevicePlan("d2", second, 18, 18, False, True, 0, 0, 0.5, 0, 0),
                ),
                left_out=(),
                explanation=(),
                exact=True,
                options=PlanOptions(),
            )
        )
    )
    assert plan.device("d2").layers == second
    broken = replace(plan, devices=(replace(plan.devices[0], layers_per_round=17), plan.devices[1]))
    with pytest.raises(ValueError, match="runs"):
        check_plan_structure(broken)


def test_one_device_holds_everything_or_streams() -> None:
    model = uniform_profile(
        name="m",
        num_layers=10,
        bytes_per_layer=100,
        flops_per_token_per_layer=1e6,
        kv_bytes_per_token_per_layer=0,
        embedding_bytes=50,
        head_bytes=50,
    )
    roomy = plan_layers(model, [DeviceProfile("solo", 10_000, 1e9, 1e3)], PlanOptions(0, 0))
    assert roomy.devices[0].window == 10 and roomy.disk_ms == 0
    tight = plan_layers(model, [DeviceProfile("solo", 450, 1e9, 1e3)], PlanOptions(0, 0))
    assert tight.devices[0].window == 3  # 450 - 100 embedding/head = room for 3 layers
    # Window 3: one layer pinned, nine streamed through two slots each token.
    assert tight.devices[0].streamed_layers == 9
    assert tight.disk_ms == pytest.approx(9 * 100 / 1e3 * 1000)
    windowed = plan_layers(
        model, [DeviceProfile("solo", 450, 1e9, 1e3)], PlanOptions(0, 0, window_covers_run=True)
    )
    assert windowed.rounds == 4 and windowed.devices[0].layers_per_round == 3


def test_identical_devices_get_a_balanced_split() -> None:
    model = uniform_profile(
        name="m",
        num_layers=30,
        bytes_per_layer=100,
        flops_per_token_per_layer=1e6,
        kv_bytes_per_token_per_layer=0,
    )
    # Each device holds at most 8 layers, so all four are needed; 30 = 8 + 8 + 7 + 7.
    devices = [DeviceProfile(f"d{i}", 800, 1e9, 1e3, 1.0) for i in range(4)]
    plan = plan_layers(model, devices, PlanOptions(0, 0))
    assert sorted(held(plan)) == [7, 7, 8, 8]
    assert plan.ring == ("d0", "d1", "d2", "d3")


def test_uneven_layer_counts_drop_nothing() -> None:
    model = uniform_profile(
        name="m",
        num_layers=37,
        bytes_per_layer=10,
        flops_per_token_per_layer=1e6,
        kv_bytes_per_token_per_layer=1,
    )
    devices = [DeviceProfile(f"d{i}", 60 + 35 * i, 1e9 * (i + 1), 100.0, 1.0) for i in range(3)]
    for options in (PlanOptions(2, 0), PlanOptions(2, 0, window_covers_run=True)):
        plan = plan_layers(model, devices, options)
        assert sorted(layer for m in plan.devices for layer in m.layers) == list(range(37))


def test_slow_distant_device_is_left_out() -> None:
    model = uniform_profile(
        name="m",
        num_layers=20,
        bytes_per_layer=100,
        flops_per_token_per_layer=1e9,
        kv_bytes_per_token_per_layer=0,
    )
    # Streaming is slow (0.1 s a layer), so the two fast devices share the 20 layers; the slow
    # one could hold everything but takes 0.1 s a layer and 50 ms a hop.
    fast = [DeviceProfile(f"fast{i}", 1200, 1e12, 1e3, 1.0) for i in range(2)]
    slow = DeviceProfile("slow", 100_000, 1e10, 1e3, 50.0)
    plan = plan_layers(model, [*fast, slow], PlanOptions(0, 0))
    assert plan.left_out == ("slow",)
    assert any(line.startswith("slow is left out") for line in plan.explanation)


def test_infeasible_names_the_shortfall_in_bytes() -> None:
    model = uniform_profile(
        name="big",
        num_layers=8,
        bytes_per_layer=1000,
        flops_per_token_per_layer=1.0,
        kv_bytes_per_token_per_layer=10,
        embedding_bytes=500,
        head_bytes=500,
    )
    devices = [DeviceProfile("a", 1500, 1.0, 1.0), DeviceProfile("b", 1500, 1.0, 1.0)]
    with pytest.raises(InfeasiblePlanError) as caught:
        plan_layers(model, devices, PlanOptions(context_tokens=20, reserve_bytes=100))
    # Best case: one-layer windows, 8 layers x 200 KV bytes, embedding and head on either side:
    # a: 100 + 1000 + 200h_a + 500, b: 100 + 1000 + 200h_b + 500, h_a + h_b = 8 -> 4800 vs 3000.
    assert caught.value.shortfall_bytes == 1800
    assert "1800 bytes" in str(caught.value)
    assert sum(caught.value.per_device_shortfall.values()) == 1800


def test_per_peer_latencies_choose_the_cheap_direction() -> None:
    model = uniform_profile(
        name="m",
        num_layers=9,
        bytes_per_layer=100,
        flops_per_token_per_layer=1e6,
        kv_bytes_per_token_per_layer=0,
    )
    ids = ["a", "b", "c"]
    cheap_next = {"a": "b", "b": "c", "c": "a"}
    devices = [
        DeviceProfile(
            i,
            300,
            1e9,
            1e3,
            100.0,
            {j: (1.0 if cheap_next[i] == j else 100.0) for j in ids if j != i},
        )
        for i in ids
    ]
    plan = plan_layers(model, devices, PlanOptions(0, 0))
    assert " ".join(plan.ring * 2).find(" ".join(["a", "b", "c"])) >= 0
    assert plan.network_ms == pytest.approx(3.0)
    assert plan.exact


def test_many_devices_with_per_peer_latencies_fall_back_and_say_so() -> None:
    model = uniform_profile(
        name="m",
        num_layers=12,
        bytes_per_layer=100,
        flops_per_token_per_layer=1e6,
        kv_bytes_per_token_per_layer=0,
    )
    devices = [DeviceProfile(f"d{i}", 500, 1e9, 1e3, 2.0, {"d0": 1.0}) for i in range(4)]
    plan = plan_layers(model, devices, PlanOptions(0, 0, max_exact_order_devices=3))
    assert not plan.exact
    assert any("not proven optimal" in line for line in plan.explanation)
    check_plan_structure(plan)


def test_plan_json_round_trip_and_required_keys() -> None:
    model = profile_from_config(QWEN3_4B, name="Qwen3-4B")
    plan = plan_layers(model, [mac("mac-a", 6 * GIB), mac("mac-b", 5 * GIB)])
    text = to_json(plan)
    assert from_json(text) == plan
    import json

    data = json.loads(text)
    for key in ("ring", "rounds", "predicted_ms_per_token", "devices"):
        assert key in data
    for entry in data["devices"]:
        assert {"id", "layers", "window"} <= set(entry)


def test_minimal_plan_json_from_the_issue_parses() -> None:
    text = """{"ring": ["mac-a", "mac-b"], "rounds": 2, "predicted_ms_per_token": 41.5,
      "devices": [{"id": "mac-a", "layers": [0, 1, 2, 6, 7, 8], "window": 3},
                  {"id": "mac-b", "layers": [3, 4, 5, 9, 10, 11], "window": 3}]}"""
    plan = from_json(text)
    assert plan.num_layers == 12 and plan.device("mac-b").layers_per_round == 3
    assert plan.head_device == "mac-b"
    with pytest.raises(ValueError, match="exactly one"):
        from_json(text.replace("[3, 4, 5, 9, 10, 11]", "[3, 4, 5, 9, 10, 12]"))
