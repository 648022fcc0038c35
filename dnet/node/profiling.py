"""What a device can give the ring: compute speed, disk read speed and a memory budget.

The planner consumes these numbers (planner.DeviceProfile); measuring needs MLX, so it
lives here.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import psutil

GIB = 1 << 30
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30,
          "tib": 1 << 40, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(text: str) -> int:
    """'8GB' -> 8e9, '512MB' -> 512e6, '2GiB' -> 2*2**30, '1000' -> 1000 bytes."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (try 8GB, 512MB or 2GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(value: int | None) -> str:
    """1536 -> '1.5 KiB', for people."""
    value = value or 0
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def default_memory_budget() -> int:
    """Memory the node offers for weights and KV cache, leaving room for everything else.

    On macOS, Metal's recommended working set (what the GPU may keep resident) less 2 GiB;
    elsewhere the memory available now less 20% (at least 1 GiB) for the OS, Python and MLX.
    """
    if platform.system() == "Darwin" and mx.metal.is_available():
        working_set = int(mx.device_info()["max_recommended_working_set_size"])
        return max(0, working_set - 2 * GIB)
    available = psutil.virtual_memory().available
    return max(0, available - max(GIB, available // 5))


def chip_name() -> str:
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=2).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def platform_name() -> str:
    return f"{platform.system().lower()}-{platform.machine().lower()}"


def measure_flops(seconds: float = 0.3, size: int = 2048) -> float:
    """FLOP/s of a decode-shaped step: one token through a square bf16 weight matrix.

    Decode multiplies one token's activations by every weight, so this is what bounds a
    layer's time per token (memory bandwidth more than peak matmul speed).
    """
    weights = mx.random.normal((size, size)).astype(mx.bfloat16)
    token = mx.random.normal((1, size)).astype(mx.bfloat16)
    mx.eval(weights, token)
    mx.eval(token @ weights.T)  # warm-up
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        mx.eval(token @ weights.T)
        count += 1
    return 2.0 * size * size * count / elapsed


def measure_disk_read(directory: Path | None = None, size: int = 64 << 20) -> float:
    """Bytes/s reading a file as the OS serves it: model files when there are some,
    otherwise a temporary file (then mostly the page cache, as streamed weights are too)."""
    files = sorted(directory.glob("*.safetensors")) if directory else []
    if files:
        return _read_speed(files, size)
    with tempfile.NamedTemporaryFile(prefix="dnet-disk-", delete=False) as handle:
        handle.write(os.urandom(1 << 20) * (size >> 20))
        path = Path(handle.name)
    try:
        return _read_speed([path], size)
    finally:
        path.unlink(missing_ok=True)


def _read_speed(files: list[Path], limit: int) -> float:
    total, started = 0, time.perf_counter()
    for file in files:
        with open(file, "rb") as handle:
            while total < limit and (chunk := handle.read(8 << 20)):
                total += len(chunk)
        if total >= limit:
            break
    return total / max(time.perf_counter() - started, 1e-9)


def memory_used_bytes() -> int:
    """Resident memory of this process (MLX buffers live in it on every backend)."""
    return psutil.Process().memory_info().rss
