"""Exact optimality: the planner's plan is exactly what brute force over every plan finds.

Brute force (tests/planner/reference.py) tries every ring (device subset and order), every
per-round run vector (so every number of rounds k), and every window, evaluating each with an
independent re-implementation of the cost model, and applies the objective: the shortest
period among plans within the latency tolerance of the fastest, then the fastest of those.
Instances reach 4 devices and 12 layers, with the default tolerance and with none (the fastest
plan alone, the objective before the period was added).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from planner import InfeasiblePlanError, plan_layers
from tests.planner.instances import random_instance
from tests.planner.reference import brute_force, recompute_ms, recompute_period_ms


def assert_matches_brute_force(
    seed: int,
    devices: int,
    max_layers: int,
    covers: bool,
    per_peer: bool = False,
    joint_windows: bool = False,
) -> None:
    model, fleet, options = random_instance(seed, devices, max_layers, covers, per_peer)
    for tolerance in (options.latency_tolerance, 0.0):
        check(model, fleet, replace(options, latency_tolerance=tolerance), joint_windows)


def check(model, fleet, options, joint_windows: bool) -> None:
    expected = brute_force(model, fleet, options, joint_windows=joint_windows)
    try:
        plan = plan_layers(model, fleet, options)
    except InfeasiblePlanError as error:
        assert expected.best_ms == math.inf, f"planner found nothing, brute force {expected}"
        assert error.shortfall_bytes == expected.least_shortfall_bytes > 0
        assert str(error.shortfall_bytes) in str(error)
        return
    assert plan.exact
    assert plan.predicted_ms_per_token == pytest.approx(expected.best_ms, rel=1e-9, abs=1e-9)
    assert plan.period_ms == pytest.approx(expected.period_ms, rel=1e-9, abs=1e-9)
    assert recompute_ms(model, fleet, options, plan) == pytest.approx(
        plan.predicted_ms_per_token, rel=1e-9, abs=1e-9
    )
    assert recompute_period_ms(model, fleet, plan) == pytest.approx(
        plan.period_ms, rel=1e-9, abs=1e-9
    )


@pytest.mark.parametrize("covers", [False, True], ids=["free-windows", "window-covers-run"])
@pytest.mark.parametrize("seed", range(4))
def test_four_devices_twelve_layers(seed: int, covers: bool) -> None:
    assert_matches_brute_force(seed, devices=4, max_layers=12, covers=covers)


@pytest.mark.parametrize("covers", [False, True], ids=["free-windows", "window-covers-run"])
@pytest.mark.parametrize("seed", range(100, 130))
def test_three_devices(seed: int, covers: bool) -> None:
    assert_matches_brute_force(seed, devices=3, max_layers=9, covers=covers)


@pytest.mark.parametrize("covers", [False, True], ids=["free-windows", "window-covers-run"])
@pytest.mark.parametrize("seed", range(200, 240))
def test_one_and_two_devices(seed: int, covers: bool) -> None:
    assert_matches_brute_force(seed, devices=1 + seed % 2, max_layers=12, covers=covers)


@pytest.mark.parametrize("covers", [False, True], ids=["free-windows", "window-covers-run"])
@pytest.mark.parametrize("seed", range(300, 312))
def test_per_peer_latencies(seed: int, covers: bool) -> None:
    devices = 4 if seed % 4 == 0 else 3
    assert_matches_brute_force(
        seed, devices, max_layers=10 if devices == 4 else 9, covers=covers, per_peer=True
    )


@pytest.mark.parametrize("covers", [False, True], ids=["free-windows", "window-covers-run"])
@pytest.mark.parametrize("seed", range(400, 410))
def test_joint_window_enumeration(seed: int, covers: bool) -> None:
    """Every combination of windows together, not device by device."""
    assert_matches_brute_force(seed, devices=3, max_layers=7, covers=covers, joint_windows=True)


def test_instances_cover_streaming_infeasible_and_left_out_devices() -> None:
    """The random instances above exercise the interesting regimes, not just easy ones: among
    them, plans the tolerance makes slower for one stream but shorter in period."""
    streamed = infeasible = left_out = multi_round = traded = 0
    for seed in range(100, 130):
        for covers in (False, True):
            model, fleet, options = random_instance(seed, 3, 9, covers)
            try:
                plan = plan_layers(model, fleet, options)
            except InfeasiblePlanError:
                infeasible += 1
                continue
            fastest = plan_layers(model, fleet, replace(options, latency_tolerance=0.0))
            traded += (plan.period_ms < fastest.period_ms
                       and plan.predicted_ms_per_token > fastest.predicted_ms_per_token)
            streamed += plan.disk_ms > 0
            left_out += bool(plan.left_out)
            multi_round += plan.rounds > 1 and len(plan.ring) > 1
    assert min(streamed, infeasible, left_out, multi_round, traded) > 0
