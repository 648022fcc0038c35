"""Measuring helpers shared by the benchmark scripts in tools/."""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit


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
    """Stream one completion with EOS banned (fixed length), recording every token's arrival.

    A lean client on purpose (the standard library's http.client, one JSON parse per event):
    the benchmarks run it on the cores the nodes compute on, and httpx's streaming cost
    0.5 ms of CPU per token there, a tenth of a core at 200 tok/s taken from the ring."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "return_token_ids": True}
    target = urlsplit(url)
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=timeout_s)
    arrivals: list[float] = []
    try:
        started = time.perf_counter()
        connection.request("POST", "/v1/completions", json.dumps(body),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
        while line := response.readline():
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk["choices"]:
                arrivals.extend(now for _ in choice.get("token_ids", []))
    finally:
        connection.close()
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
