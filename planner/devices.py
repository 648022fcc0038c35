"""Device profiles and planning options: the measured numbers the planner consumes.

Measuring is dnet's job (it needs MLX); here they are plain data, read from `devices.json`:
a list of objects like
`{"id": "mac-a", "memory_budget_bytes": 17179869184, "flops": 2.0e12,
"disk_read_bytes_per_s": 3.0e9, "latency_ms": 2.0, "peer_latency_ms": {"mac-b": 1.5}}`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 1024**3
# Python, MLX's runtime, activations and gRPC buffers of one shard process, measured loosely on
# small models; raise it for long prompts (prefill activations grow with prompt length).
DEFAULT_RESERVE_BYTES = 1 * GIB
DEFAULT_CONTEXT_TOKENS = 4096
# Orders are enumerated exactly when per-peer latencies are given; beyond this many devices the
# planner falls back to each device's mean latency (see README, "What optimal covers").
DEFAULT_MAX_EXACT_ORDER_DEVICES = 6
# How much slower one stream's decode may be than in the fastest plan, as a fraction, for a plan
# whose busiest device does less per token (a shorter pipeline period: faster prefill and
# concurrent decode). See README, "Objective".
DEFAULT_LATENCY_TOLERANCE = 0.10


@dataclass(frozen=True)
class DeviceProfile:
    """One device. `latency_ms` is the default cost of a hop this device sends; entries of
    `peer_latency_ms` override it for particular receivers."""

    id: str
    memory_budget_bytes: int
    flops: float
    disk_read_bytes_per_s: float
    latency_ms: float = 0.0
    peer_latency_ms: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("a device needs a non-empty id")
        if self.memory_budget_bytes < 0:
            raise ValueError(f"{self.id}: memory_budget_bytes must be >= 0")
        if self.flops <= 0 or self.disk_read_bytes_per_s <= 0:
            raise ValueError(f"{self.id}: flops and disk_read_bytes_per_s must be > 0")
        if self.latency_ms < 0 or any(v < 0 for v in self.peer_latency_ms.values()):
            raise ValueError(f"{self.id}: latencies must be >= 0")

    def latency_to_ms(self, peer_id: str) -> float:
        return float(self.peer_latency_ms.get(peer_id, self.latency_ms))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "memory_budget_bytes": self.memory_budget_bytes,
            "flops": self.flops,
            "disk_read_bytes_per_s": self.disk_read_bytes_per_s,
            "latency_ms": self.latency_ms,
        }
        if self.peer_latency_ms:
            data["peer_latency_ms"] = dict(self.peer_latency_ms)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceProfile:
        missing = [
            key
            for key in ("id", "memory_budget_bytes", "flops", "disk_read_bytes_per_s")
            if key not in data
        ]
        if missing:
            raise ValueError(f"device entry {dict(data)!r} lacks {missing}")
        peers = data.get("peer_latency_ms") or {}
        return cls(
            id=str(data["id"]),
            memory_budget_bytes=int(data["memory_budget_bytes"]),
            flops=float(data["flops"]),
            disk_read_bytes_per_s=float(data["disk_read_bytes_per_s"]),
            latency_ms=float(data.get("latency_ms", 0.0)),
            peer_latency_ms={str(k): float(v) for k, v in peers.items()},
        )


@dataclass(frozen=True)
class PlanOptions:
    """What the plan reserves memory for, and which engine behaviour it assumes.

    `window_covers_run`: require each device's window to hold a whole per-round run (n_i <= w_i),
    as an engine that loads a run as one unit needs (the seed's `--prefetch-window`). Without it,
    windows and runs are independent and one round is always optimal (README, "Rounds").

    `latency_tolerance`: the plan may decode one stream up to this fraction slower than the
    fastest plan if that shortens the pipeline period (README, "Objective"); 0 minimises one
    stream's time alone.
    """

    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    reserve_bytes: int = DEFAULT_RESERVE_BYTES
    window_covers_run: bool = False
    max_exact_order_devices: int = DEFAULT_MAX_EXACT_ORDER_DEVICES
    latency_tolerance: float = DEFAULT_LATENCY_TOLERANCE

    def __post_init__(self) -> None:
        if self.context_tokens < 0 or self.reserve_bytes < 0:
            raise ValueError("context_tokens and reserve_bytes must be >= 0")
        if self.max_exact_order_devices < 1:
            raise ValueError("max_exact_order_devices must be >= 1")
        if not 0 <= self.latency_tolerance < 10:
            raise ValueError("latency_tolerance must be in [0, 10)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "context_tokens": self.context_tokens,
            "reserve_bytes": self.reserve_bytes,
            "window_covers_run": self.window_covers_run,
            "max_exact_order_devices": self.max_exact_order_devices,
            "latency_tolerance": self.latency_tolerance,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanOptions:
        defaults = cls()
        return cls(
            context_tokens=int(data.get("context_tokens", defaults.context_tokens)),
            reserve_bytes=int(data.get("reserve_bytes", defaults.reserve_bytes)),
            window_covers_run=bool(data.get("window_covers_run", defaults.window_covers_run)),
            max_exact_order_devices=int(
                data.get("max_exact_order_devices", defaults.max_exact_order_devices)
            ),
            latency_tolerance=float(data.get("latency_tolerance", defaults.latency_tolerance)),
        )


def devices_from_list(entries: Sequence[Mapping[str, Any]]) -> list[DeviceProfile]:
    devices = [DeviceProfile.from_dict(entry) for entry in entries]
    seen: set[str] = set()
    for device in devices:
        if device.id in seen:
            raise ValueError(f"device id {device.id!r} appears twice")
        seen.add(device.id)
    return devices


def load_devices_json(path: str | Path) -> list[DeviceProfile]:
    """Reads a devices file: a JSON list of device objects (or {"devices": [...]})."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, Mapping):
        data = data.get("devices")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path} must hold a non-empty JSON list of devices")
    return devices_from_list(data)
