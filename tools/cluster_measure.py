"""The cluster benchmark's measurements: start the baseline and the rings, warm them up, then
measure each figure on every configuration in turn, repetition by repetition.

Every repetition sends the same fresh random prompt(s) to the baseline and to every ring, so
they compute the same thing and no cache can carry over between repetitions. Runs on a thread
inside the client namespace (HTTP to the nodes crosses the bridge like a remote client's).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import random_prompt
from benchlib import concurrent_traces, steady_decode_tok_s, stream_trace
from cluster_baseline import Baseline
from cluster_lan import ClusterLan
from cluster_nodes import ClusterStartError, RingCluster, check_pinning, listening
from cluster_report import ConfigResult

FLOOR_PORT = 50600
WARMUP_TOKENS = 8
WARMUP_ATTEMPTS = 5
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class Measurer:
    def __init__(self, args: argparse.Namespace, lan: ClusterLan, model: Path, vocab_size: int,
                 clusters: list[RingCluster], say: Callable[[str], None],
                 prefill_chunk: int) -> None:
        self.args, self.lan, self.model, self.vocab = args, lan, model, vocab_size
        self.prefill_chunk = prefill_chunk
        self.clusters, self.say = clusters, say
        self.cpus: dict[str, str] = {}
        self.baseline: Baseline | None = None
        self.baseline_result = ConfigResult("mlx-lm, 1 node", 1)
        self.ring_results = [ConfigResult(c.label, c.nodes) for c in clusters]
        self.floor_rtt_ms: list[float] = []
        self.floor_bytes = args.hidden * DTYPE_BYTES[args.dtype]

    def prompt(self, length: int, seed: int) -> list[int]:
        return random_prompt(self.vocab, length, seed)

    # ----- start-up ---------------------------------------------------------------------

    def start(self) -> None:
        """The baseline, then each ring once the one before is ready: a mesh measures its
        devices as it forms, and rings starting together on the same cores would skew each
        other's measurements (and so the planner's choices)."""
        head_cpus = self.clusters[0].slots[0].cpus
        process = self.lan.spawn_piped("mlx-lm", Baseline.command(), head_cpus)
        self.cpus["mlx-lm"] = head_cpus
        self.baseline = Baseline(process, self.model, self.prefill_chunk)
        self.say(f"mlx-lm ready; starting {len(self.clusters)} ring(s) one after another")
        for cluster, result in zip(self.clusters, self.ring_results, strict=True):
            cluster.start(self.lan, self.lan.log_dir / "state")
            for slot in cluster.slots:
                self.cpus[f"{cluster.label}: {slot.name}"] = slot.cpus
            cluster.wait_ready(self.lan, self.args.start_timeout)
            result.placement = cluster.placement
            assert cluster.placement is not None
            self.say(f"{cluster.label} ready at {cluster.entry_url}: "
                     f"{cluster.placement.describe()}")
        wrong = check_pinning(self.lan)
        if wrong:
            raise ClusterStartError("CPU pinning did not hold: " + "; ".join(wrong))
        self.warm_up()

    def warm_up(self) -> None:
        """A first request and a first full batch everywhere, not measured."""
        assert self.baseline is not None
        prompt = self.prompt(self.args.short_prompt, 1)
        batch = [self.prompt(self.args.short_prompt, 2 + i) for i in range(max(self.args.streams))]
        self.baseline.single(prompt, WARMUP_TOKENS)
        self.baseline.batch(batch, WARMUP_TOKENS)
        for cluster in self.clusters:
            for attempt in range(WARMUP_ATTEMPTS):
                try:
                    stream_trace(cluster.entry_url, prompt, WARMUP_TOKENS)
                    break
                except (OSError, http.client.HTTPException, RuntimeError) as exc:
                    if attempt + 1 == WARMUP_ATTEMPTS:
                        raise ClusterStartError(f"{cluster.label} does not answer: {exc}") \
                            from exc
                    time.sleep(2)
            concurrent_traces(cluster.entry_url, batch, WARMUP_TOKENS)
        self.say("warm-up done")

    # ----- measurements -------------------------------------------------------------------

    def measure(self) -> None:
        self.measure_floor()
        self.measure_decode()
        self.measure_concurrency()
        self.measure_ttft()

    def measure_floor(self) -> None:
        cluster = next((c for c in self.clusters if c.nodes >= 2), None)
        if cluster is None:
            return
        a, b = cluster.slots[0], cluster.slots[1]
        script = str(Path(__file__).resolve().parent / "cluster_floor.py")
        server = self.lan.spawn("floor-server", [sys.executable, script, "serve", "--listen",
                                                 f"{b.host.address}:{FLOOR_PORT}"],
                                b.cpus, b.host)
        deadline = time.monotonic() + 60
        while not listening(b.host.address, FLOOR_PORT):
            if time.monotonic() > deadline or server.poll() is not None:
                raise ClusterStartError(f"the TCP floor server did not start "
                                        f"(logs in {self.lan.log_dir})")
            time.sleep(0.2)
        client = self.lan.spawn("floor-client", [
            sys.executable, script, "ping", "--target", f"{b.host.address}:{FLOOR_PORT}",
            "--bytes", str(self.floor_bytes), "--count", str(self.args.floor_count)],
            a.cpus, a.host)
        client.wait(timeout=300)
        server.terminate()
        server.wait(timeout=30)
        lines = (self.lan.log_dir / "floor-client.log").read_text().strip().splitlines()
        if client.returncode != 0 or not lines:
            raise ClusterStartError(f"the TCP floor client failed (logs in {self.lan.log_dir})")
        self.floor_rtt_ms = json.loads(lines[-1])["rtt_ms"]
        self.say(f"TCP floor: {len(self.floor_rtt_ms)} round trips between "
                 f"{a.host.namespace} and {b.host.namespace}")

    def measure_decode(self) -> None:
        assert self.baseline is not None
        n = self.args.decode_tokens
        for rep in range(self.args.repeats):
            prompt = self.prompt(self.args.short_prompt, 10_000 + rep)
            self.baseline_result.decode_tok_s.append(
                self.baseline.single(prompt, n).timing().decode_tok_s)
            for cluster, result in zip(self.clusters, self.ring_results, strict=True):
                result.decode_tok_s.append(
                    stream_trace(cluster.entry_url, prompt, n).timing().decode_tok_s)
            self.say(f"one stream's decode: repetition {rep + 1} of {self.args.repeats}")

    def measure_concurrency(self) -> None:
        assert self.baseline is not None
        n = self.args.stream_tokens
        for rep in range(self.args.repeats):
            for streams in self.args.streams:
                prompts = [self.prompt(self.args.short_prompt, 20_000 + 1000 * rep
                                       + 50 * streams + i) for i in range(streams)]
                self.record(self.baseline_result, streams, self.baseline.batch(prompts, n))
                for cluster, result in zip(self.clusters, self.ring_results, strict=True):
                    self.record(result, streams, concurrent_traces(cluster.entry_url, prompts, n))
            self.say(f"concurrent streams: repetition {rep + 1} of {self.args.repeats}")

    def record(self, result: ConfigResult, streams: int, traces: list) -> None:
        rate = steady_decode_tok_s(traces)
        if rate is None:
            self.say(f"{result.name}, {streams} streams: the streams never all decoded at "
                     "once (raise --stream-tokens); repetition left out")
            return
        result.aggregate_tok_s.setdefault(streams, []).append(rate)

    def measure_ttft(self) -> None:
        assert self.baseline is not None
        for rep in range(self.args.ttft_repeats):
            for length in sorted(self.args.prompt_lengths):
                prompt = self.prompt(length, 30_000 + 100 * rep + length)
                self.baseline_result.ttft_s.setdefault(length, []).append(
                    self.baseline.single(prompt, 2).timing().ttft_s)
                for cluster, result in zip(self.clusters, self.ring_results, strict=True):
                    result.ttft_s.setdefault(length, []).append(
                        stream_trace(cluster.entry_url, prompt, 2).timing().ttft_s)
                self.say(f"TTFT of a {length}-token prompt: repetition {rep + 1} of "
                         f"{self.args.ttft_repeats}")
