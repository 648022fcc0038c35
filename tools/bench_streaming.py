"""Decode speed of a shard that streams its weights, against the disk-bound limit and against
full residency, all measured in one run.

The disk-bound limit is the read speed of the weight files (page cache, measured here by
reading them) divided by the bytes a streaming shard reloads per token: h - w + 2 layers for
window w < h layers held (dnet/weights.py).

Usage: uv run python tools/bench_streaming.py [--layers 8] [--hidden 1536] [--windows 8,4,2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import median, stream_completion  # noqa: E402

from dnet.local_ring import LocalRing  # noqa: E402
from dnet.model_facts import profile_model  # noqa: E402
from dnet.modelgen import ModelSpec, cached_model  # noqa: E402


def read_speed(files: list[Path], passes: int = 3) -> float:
    """Bytes per second reading the files start to end (warm page cache after pass one)."""
    speeds = []
    for _ in range(passes):
        total, started = 0, time.perf_counter()
        for file in files:
            with open(file, "rb") as handle:
                while chunk := handle.read(16 << 20):
                    total += len(chunk)
        speeds.append(total / (time.perf_counter() - started))
    return max(speeds[1:]) if passes > 1 else speeds[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--windows", default="8,4,2")
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    spec = ModelSpec(arch="qwen3", dtype="bfloat16", num_layers=args.layers,
                     hidden_size=args.hidden, intermediate_size=args.hidden * 10 // 3,
                     num_heads=args.hidden // 128, num_kv_heads=4, weight_files=4)
    cache = Path(tempfile.gettempdir()) / "dnet-bench-models"
    model = cached_model(spec, cache_dir=cache)
    profile = profile_model(model)
    layer_bytes = max(profile.layer_bytes)
    speed = read_speed(sorted(model.glob("*.safetensors")))
    print(f"model: {spec.name}, {args.layers} layers of {layer_bytes / 2**20:.1f} MiB; "
          f"page-cache read speed {speed / 2**30:.2f} GiB/s")

    prompt = list(range(3, 35))
    rows = []
    full_rate = None
    for window in [int(w) for w in args.windows.split(",")]:
        with LocalRing(str(model), [list(range(args.layers))],
                       shard_args=["--prefetch-window", str(window)]) as ring:
            stream_completion(ring.url, prompt, 4)  # warm-up, discarded
            rate = median([stream_completion(ring.url, prompt, args.tokens).decode_tok_s
                           for _ in range(args.repeats)])
        held = args.layers
        streamed = 0 if window >= held else held - max(window - 2, 0)
        per_token = streamed * layer_bytes
        limit = speed / per_token if per_token else float("inf")
        if window >= held:
            full_rate = rate
        rows.append((window, streamed, per_token, rate, limit))

    print("\n| window | layers read per token | MiB read per token | decode tok/s | "
          "disk-bound limit tok/s | vs disk limit | vs full residency |")
    print("|---|---|---|---|---|---|---|")
    for window, streamed, per_token, rate, limit in rows:
        vs_limit = f"{rate / limit:.2f}" if limit != float("inf") else "-"
        vs_full = f"{rate / full_rate:.2f}" if full_rate else "-"
        limit_text = f"{limit:.1f}" if limit != float("inf") else "-"
        print(f"| {window} | {streamed} | {per_token / 2**20:.0f} | {rate:.2f} | {limit_text} "
              f"| {vs_limit} | {vs_full} |")


if __name__ == "__main__":
    main()
