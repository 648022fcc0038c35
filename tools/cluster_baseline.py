"""The single-node baseline of the cluster benchmark: mlx-lm in one process of its own.

One stream runs through `mlx_lm.generate.generate_step` (what `stream_generate` drives);
concurrent streams through mlx-lm's continuous batching, `mlx_lm.generate.BatchGenerator`
(what `batch_generate` drives), all prompts inserted at once, with its default batch sizes
and no stop tokens (every stream decodes exactly `max_tokens`, as the ring's `ignore_eos`).
Both prefill in chunks of the ring's prefill chunk (`prefill_step_size`), so the baseline
computes exactly what the ring computes.

Run as a worker (`python tools/cluster_baseline.py`) it reads JSON jobs on stdin, one a line,
and answers each with one JSON line of `time.perf_counter()` stamps; `Baseline` drives it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import StreamTrace  # noqa: E402


def single(model, prompt: list[int], max_tokens: int, prefill_step_size: int) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    arrivals: list[float] = []
    started = time.perf_counter()
    for _token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens,
                                   prefill_step_size=prefill_step_size):
        arrivals.append(time.perf_counter())
    return {"started": started, "arrivals": arrivals}


def batch(model, prompts: list[list[int]], max_tokens: int, prefill_step_size: int) -> dict:
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=None,
                               prefill_step_size=prefill_step_size)
    try:
        started = time.perf_counter()
        uids = generator.insert(prompts, [max_tokens] * len(prompts))
        arrivals: dict[int, list[float]] = {uid: [] for uid in uids}
        while responses := generator.next_generated():
            now = time.perf_counter()
            for response in responses:
                arrivals[response.uid].append(now)
    finally:
        generator.close()
    return {"traces": [{"started": started, "arrivals": arrivals[uid]} for uid in uids]}


def worker() -> None:
    import mlx_lm

    model, _ = mlx_lm.load(json.loads(sys.stdin.readline())["model"])
    print(json.dumps({"ready": True}), flush=True)
    jobs: dict[str, Callable[..., dict]] = {"single": single, "batch": batch}
    for line in sys.stdin:
        job = json.loads(line)
        kind = job.pop("kind")
        print(json.dumps(jobs[kind](model, **job)), flush=True)


class BaselineDied(RuntimeError):
    pass


class Baseline:
    """Talks to a worker process someone else started (and will stop)."""

    def __init__(self, process: subprocess.Popen, model: Path, prefill_step_size: int) -> None:
        self.process = process
        self.prefill_step_size = prefill_step_size
        self._answer({"model": str(model)})

    @staticmethod
    def command() -> list[str]:
        return [sys.executable, str(Path(__file__).resolve())]

    def _answer(self, job: dict) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(json.dumps(job) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError as exc:
            raise BaselineDied("the mlx-lm baseline process died") from exc
        line = self.process.stdout.readline()
        if not line:
            raise BaselineDied("the mlx-lm baseline process died")
        return json.loads(line)

    def single(self, prompt: list[int], max_tokens: int) -> StreamTrace:
        reply = self._answer({"kind": "single", "prompt": prompt, "max_tokens": max_tokens,
                              "prefill_step_size": self.prefill_step_size})
        return StreamTrace(reply["started"], reply["arrivals"])

    def batch(self, prompts: list[list[int]], max_tokens: int) -> list[StreamTrace]:
        reply = self._answer({"kind": "batch", "prompts": prompts, "max_tokens": max_tokens,
                              "prefill_step_size": self.prefill_step_size})
        return [StreamTrace(t["started"], t["arrivals"]) for t in reply["traces"]]


if __name__ == "__main__":
    worker()
