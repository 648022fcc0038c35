"""Times the planner on the issue's sizes and prints the results (a benchmark, not a test).

Targets: 8 devices x 80 layers under 200 ms, 16 devices x 128 layers under 2 s. Each size runs
on heterogeneous devices with roomy memory and with scarce memory (several must stream), with
the default options and with `window_covers_run` (which searches every number of rounds).

    uv run python tools/bench_planner.py [--repeats N]
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner import DeviceProfile, ModelProfile, PlanOptions, plan_layers, uniform_profile  # noqa: E402

GIB = 1024**3
TARGETS_S = {(8, 80): 0.2, (16, 128): 2.0}


def bench_model(num_layers: int) -> ModelProfile:
    # Roughly a 70B-class bf16 layer, so a handful of 16-24 GiB Macs must share and stream.
    return uniform_profile(
        name=f"bench-{num_layers}",
        num_layers=num_layers,
        bytes_per_layer=int(0.85 * GIB),
        flops_per_token_per_layer=1.7e9,
        kv_bytes_per_token_per_layer=4096,
        embedding_bytes=2 * GIB,
        head_bytes=2 * GIB,
        head_flops_per_token=2.1e9,
    )


FLEETS = {
    "roomy": [8, 12, 16, 24, 32],  # GiB budgets: the model fits without streaming
    "scarce": [4, 5, 6, 8],  # total memory below the model: several devices must stream
}


def bench_devices(count: int, seed: int, budgets_gib: list[int]) -> list[DeviceProfile]:
    rng = random.Random(seed)
    return [
        DeviceProfile(
            id=f"mac-{index:02d}",
            memory_budget_bytes=rng.choice(budgets_gib) * GIB,
            flops=rng.uniform(1e12, 8e12),
            disk_read_bytes_per_s=rng.uniform(1.5e9, 6e9),
            latency_ms=rng.uniform(0.5, 4.0),
        )
        for index in range(count)
    ]


def time_case(
    devices: int, layers: int, budgets_gib: list[int], options: PlanOptions, repeats: int
) -> tuple[float, str]:
    model = bench_model(layers)
    fleet = bench_devices(devices, devices * 1000 + layers, budgets_gib)
    timings = []
    summary = ""
    for _ in range(repeats):
        start = time.perf_counter()
        plan = plan_layers(model, fleet, options)
        timings.append(time.perf_counter() - start)
        summary = (
            f"ring of {len(plan.ring)}, {plan.rounds} round(s), "
            f"{plan.predicted_ms_per_token:.1f} ms/token predicted"
        )
    return statistics.median(timings), summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    failures = 0
    for label, options in (
        ("default", PlanOptions()),
        ("window_covers_run", PlanOptions(window_covers_run=True)),
    ):
        for (fleet, budgets_gib), ((devices, layers), target_s) in itertools.product(
            FLEETS.items(), TARGETS_S.items()
        ):
            median_s, summary = time_case(devices, layers, budgets_gib, options, args.repeats)
            verdict = "ok" if median_s < target_s else "SLOW"
            failures += verdict != "ok"
            print(
                f"{label:17s} {fleet:6s} {devices:2d} devices x {layers:3d} layers: "
                f"{median_s * 1000:8.1f} ms (target < {target_s * 1000:.0f} ms) {verdict}  "
                f"[{summary}]"
            )
    # Per-peer latencies make ring order matter; orders are enumerated (no target, for scale).
    model = bench_model(80)
    for devices in (4, 6):
        fleet = bench_devices(devices, 7, FLEETS["roomy"])
        rng = random.Random(devices)
        fleet = [
            replace(d, peer_latency_ms={e.id: rng.uniform(0.5, 4.0) for e in fleet if e is not d})
            for d in fleet
        ]
        start = time.perf_counter()
        plan = plan_layers(model, fleet)
        print(
            f"per-peer latencies {devices:2d} devices x  80 layers: "
            f"{(time.perf_counter() - start) * 1000:8.1f} ms (no target; exact={plan.exact})"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
