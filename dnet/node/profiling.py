"""What a device can give the ring: compute speed, disk read speed and a memory budget.

The planner consumes these numbers (planner.DeviceProfile); measuring needs MLX, so it
lives here, apart from what needs no MLX (byte sizes: dnet/node/sizes.py).
"""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import psutil

from planner.devices import GIB


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
    layer's time per token (memory bandwidth more than peak matmul speed). The fastest of the
    steps timed in `seconds`: a busy moment (other nodes starting on the same machine, a model
    loading) only ever slows a step, and must not make the planner leave a node out.
    """
    weights = mx.random.normal((size, size)).astype(mx.bfloat16)
    token = mx.random.normal((1, size)).astype(mx.bfloat16)
    mx.eval(weights, token)
    mx.eval(token @ weights.T)  # warm-up
    fastest, started = float("inf"), time.perf_counter()
    while time.perf_counter() - started < seconds:
        step = time.perf_counter()
        mx.eval(token @ weights.T)
        fastest = min(fastest, time.perf_counter() - step)
    return 2.0 * size * size / fastest


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
