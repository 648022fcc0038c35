"""Measuring helpers shared by the benchmark scripts in tools/."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import httpx


@dataclass
class StreamTiming:
    ttft_s: float  # request sent -> first token
    tokens: int
    decode_tok_s: float  # (n - 1) / (t_last - t_first)


def stream_completion(url: str, prompt: list[int], max_tokens: int,
                      timeout_s: float = 600.0) -> StreamTiming:
    """Stream one completion with EOS banned (fixed length) and time every token."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "return_token_ids": True}
    arrivals: list[float] = []
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body,
                      timeout=timeout_s) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            now = time.perf_counter()
            for choice in chunk["choices"]:
                arrivals.extend(now for _ in choice.get("token_ids", []))
    if len(arrivals) < 2:
        raise RuntimeError(f"expected {max_tokens} tokens, got {len(arrivals)}")
    decode = (len(arrivals) - 1) / max(arrivals[-1] - arrivals[0], 1e-9)
    return StreamTiming(arrivals[0] - started, len(arrivals), decode)


def median(values: list[float]) -> float:
    return statistics.median(values)
