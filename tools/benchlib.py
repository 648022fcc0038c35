"""Measuring helpers shared by the benchmark scripts in tools/."""

from __future__ import annotations

import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx


@dataclass
class StreamTiming:
    ttft_s: float  # request sent -> first token
    tokens: int
    decode_tok_s: float  # (n - 1) / (t_last - t_first)


@dataclass
class StreamTrace:
    """When one streamed completion was sent and when each of its tokens arrived."""

    started: float  # time.perf_counter() just before the request was sent
    arrivals: list[float]  # time.perf_counter() of every token, in order

    def timing(self) -> StreamTiming:
        decode = (len(self.arrivals) - 1) / max(self.arrivals[-1] - self.arrivals[0], 1e-9)
        return StreamTiming(self.arrivals[0] - self.started, len(self.arrivals), decode)


def stream_trace(url: str, prompt: list[int], max_tokens: int,
                 timeout_s: float = 600.0) -> StreamTrace:
    """Stream one completion with EOS banned (fixed length), recording every token's arrival."""
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
    return StreamTrace(started, arrivals)


def stream_completion(url: str, prompt: list[int], max_tokens: int,
                      timeout_s: float = 600.0) -> StreamTiming:
    """Stream one completion with EOS banned (fixed length) and time every token."""
    return stream_trace(url, prompt, max_tokens, timeout_s).timing()


def concurrent_traces(url: str, prompts: list[list[int]], max_tokens: int,
                      timeout_s: float = 600.0) -> list[StreamTrace]:
    """One thread per prompt, all released together, each streaming one completion."""
    barrier = threading.Barrier(len(prompts))

    def one(prompt: list[int]) -> StreamTrace:
        barrier.wait(timeout=timeout_s)
        return stream_trace(url, prompt, max_tokens, timeout_s)

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return list(pool.map(one, prompts))


def aggregate_decode_tok_s(traces: list[StreamTrace]) -> float:
    """Tokens decoded after each stream's first token, over the wall time from the earliest
    first token to the latest last token: sum(n_i - 1) / (max(t_last) - min(t_first))."""
    decoded = sum(len(t.arrivals) - 1 for t in traces)
    span = max(t.arrivals[-1] for t in traces) - min(t.arrivals[0] for t in traces)
    return decoded / max(span, 1e-9)


def steady_decode_tok_s(traces: list[StreamTrace]) -> float | None:
    """Aggregate decode tok/s while every stream decodes: the tokens that arrive after the
    last stream's first token, up to the first stream's last token, over that window. With
    staggered starts (a ring prefills concurrent prompts one after another, mlx-lm's
    BatchGenerator all at once) this leaves out the prefill of later streams, which
    `aggregate_decode_tok_s` counts as decode time. None when the streams never all decode
    at once."""
    start = max(t.arrivals[0] for t in traces)
    end = min(t.arrivals[-1] for t in traces)
    if end <= start:
        return None
    tokens = sum(1 for t in traces for arrival in t.arrivals if start < arrival <= end)
    return tokens / (end - start)


def median(values: list[float]) -> float:
    return statistics.median(values)
