"""Random small planning instances, shared by the brute-force and property tests."""

from __future__ import annotations

import random

from planner import DeviceProfile, ModelProfile, PlanOptions, uniform_profile


def random_model(rng: random.Random, num_layers: int) -> ModelProfile:
    return uniform_profile(
        name="random",
        num_layers=num_layers,
        bytes_per_layer=rng.randint(1, 60),
        flops_per_token_per_layer=rng.uniform(1.0, 100.0),
        kv_bytes_per_token_per_layer=rng.randint(0, 3),
        embedding_bytes=rng.randint(0, 80),
        head_bytes=rng.randint(0, 80),
        head_flops_per_token=rng.uniform(0.0, 200.0),
        tied_embeddings=rng.random() < 0.5,
    )


def random_devices(rng: random.Random, count: int, per_peer: bool = False) -> list[DeviceProfile]:
    ids = [f"d{index}" for index in range(count)]
    devices = []
    for device_id in ids:
        peers = {}
        if per_peer:
            peers = {
                peer: rng.uniform(0.0, 3000.0)
                for peer in ids
                if peer != device_id and rng.random() < 0.8
            }
        devices.append(
            DeviceProfile(
                id=device_id,
                memory_budget_bytes=rng.randint(0, 500),
                flops=rng.uniform(1.0, 20.0),
                disk_read_bytes_per_s=rng.uniform(0.5, 10.0),
                # Latencies comparable to a layer's time, so leaving devices out can pay.
                latency_ms=rng.uniform(0.0, 3000.0),
                peer_latency_ms=peers,
            )
        )
    return devices


def random_options(rng: random.Random, window_covers_run: bool) -> PlanOptions:
    return PlanOptions(
        context_tokens=rng.randint(0, 4),
        reserve_bytes=rng.randint(0, 40),
        window_covers_run=window_covers_run,
        latency_tolerance=rng.choice([0.1, 0.3, 1.0]),
    )


def random_instance(
    seed: int, devices: int, max_layers: int, window_covers_run: bool, per_peer: bool = False
) -> tuple[ModelProfile, list[DeviceProfile], PlanOptions]:
    rng = random.Random(seed)
    num_layers = rng.randint(max(1, max_layers - 4), max_layers)
    return (
        random_model(rng, num_layers),
        random_devices(rng, devices, per_peer),
        random_options(rng, window_covers_run),
    )
