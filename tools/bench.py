"""The ring against single-process mlx-lm, on one generated model, in one run.

Measures a single-process baseline (mlx_lm `generate_step`, in a subprocess of its own) and
local rings of 1, 2 and 3 shards on loopback through the HTTP API (`/v1/completions`,
streaming, `ignore_eos`, token-id prompts), then prints markdown tables with the ratios
against the baseline and the issue's targets (ok/MISS), and writes JSON (and a PNG plot when
matplotlib is importable).

What is measured (every figure is the median of --repeats repetitions, after a discarded
warm-up; every repetition uses fresh random prompt ids, so no prefix is ever reused):
- TTFT per prompt length (default 32 and 512 tokens). Ring: from sending the HTTP request to
  the first streamed token. Baseline: from calling `generate_step` to its first token.
- Decode tok/s = (n - 1) / (t_last - t_first) over n = --tokens tokens (32-token prompt).
- Per-hop overhead (ms) for k shards = (ms/token at k shards - ms/token at 1 shard) / k: a
  1-shard ring makes no network hop per token, a k-shard ring k (the tail sends the next
  token straight to the head). It lumps every per-shard cost (one more process on the same
  cores, serialisation, gRPC), so it is an upper bound on the pure network cost.
- Aggregate decode tok/s with 1, 2, 4 and 8 concurrent streams (one thread each, released
  together): sum over streams of (n_i - 1) / (latest last token - earliest first token).
  Measured on the 1- and 2-shard rings; its ratio is to the same ring's 1-stream figure. The
  baseline is one process serving requests one after another in arrival order, so its
  aggregate is its single-stream decode figure at every concurrency (not measured).

Usage:
    uv run python tools/bench.py [--layers 8] [--hidden 384] [--tokens 64] [--repeats 3]
                                 [--json bench-results.json] [--plot bench.png]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    StreamTiming,
    aggregate_decode_tok_s,
    concurrent_traces,
    median,
    stream_completion,
)

from dnet.local_ring import LocalRing, even_split  # noqa: E402
from dnet.modelgen import ModelSpec, cached_model  # noqa: E402

FIRST_ORDINARY_TOKEN = 3  # ids 0-2 are the generated tokenizer's special tokens
CONCURRENCY_WARMUP_TOKENS = 8
BUSY_LOAD = 0.5  # 1-min load average before the run above which the figures are flagged


# --- configuration and plan -------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One single-stream measurement: a prompt and how many tokens to generate."""

    length: int  # prompt length, the key TTFT is reported under
    rep: int  # -1 for the discarded warm-up
    prompt: list[int]
    max_tokens: int
    decode: bool  # whether its decode rate is reported


def random_prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(FIRST_ORDINARY_TOKEN, vocab_size) for _ in range(length)]


def single_stream_plan(vocab_size: int, lengths: list[int], repeats: int,
                       tokens: int) -> list[Run]:
    """Warm-up first, then the repetitions; decode is timed on the shortest prompt."""
    shortest = min(lengths)
    runs = []
    for rep in range(-1, repeats):
        for length in lengths:
            decode = length == shortest
            runs.append(Run(length, rep, random_prompt(vocab_size, length, 1000 * length + rep),
                            tokens if decode else 2, decode))
    return runs


# --- results ----------------------------------------------------------------------------

@dataclass
class SingleStream:
    """Medians (and the raw repetitions) of one configuration's single-stream runs."""

    name: str
    shards: int  # 0 for the single-process baseline
    ttft_ms: dict[str, float]  # prompt length -> median TTFT
    decode_tok_s: float
    ttft_samples_ms: dict[str, list[float]] = field(default_factory=dict)
    decode_samples: list[float] = field(default_factory=list)

    @property
    def ms_per_token(self) -> float:
        return 1000.0 / self.decode_tok_s


@dataclass
class ConcurrencyPoint:
    streams: int
    aggregate_tok_s: float  # median over repetitions
    ratio_to_single: float  # against the same configuration's 1-stream figure
    samples: list[float] = field(default_factory=list)


@dataclass
class Concurrency:
    name: str
    shards: int
    points: list[ConcurrencyPoint]
    note: str = ""


@dataclass
class Target:
    name: str
    measured: float | None
    op: str  # ">=", "<=" or ">"
    threshold: float
    unit: str = "x"

    @property
    def ok(self) -> bool:
        if self.measured is None:
            return False
        return {">=": self.measured >= self.threshold, "<=": self.measured <= self.threshold,
                ">": self.measured > self.threshold}[self.op]


@dataclass
class Report:
    machine: dict
    model: dict
    settings: dict
    baseline: SingleStream
    rings: list[SingleStream]
    hop_ms: dict[str, float]
    concurrency: list[Concurrency]
    targets: list[Target] = field(default_factory=list)
    elapsed_s: float = 0.0

    def to_json(self) -> dict:
        data = asdict(self)
        data["targets"] = [{**asdict(t), "ok": t.ok} for t in self.targets]
        return data


def summarize(name: str, shards: int, runs: list[Run],
              timings: list[StreamTiming]) -> SingleStream:
    """Medians over the repetitions, the warm-up left out."""
    ttft: dict[str, list[float]] = {}
    decode: list[float] = []
    for run, timing in zip(runs, timings, strict=True):
        if run.rep < 0:
            continue
        ttft.setdefault(str(run.length), []).append(timing.ttft_s * 1000)
        if run.decode:
            decode.append(timing.decode_tok_s)
    return SingleStream(name, shards, {k: median(v) for k, v in ttft.items()}, median(decode),
                        ttft, decode)


# --- machine and model ------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import mlx.core as mx

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cores": cores, "platform": platform.platform(),
            "python": platform.python_version(), "mlx_device": str(mx.default_device()),
            "mlx": metadata.version("mlx"), "mlx_lm": metadata.version("mlx-lm"),
            "loadavg_start": os.getloadavg()[0]}


def model_spec(layers: int, hidden: int) -> ModelSpec:
    if hidden % 16:
        raise SystemExit("--hidden must be a multiple of 16 (8 heads of an even head size)")
    return ModelSpec(arch="qwen3", dtype="bfloat16", num_layers=layers, hidden_size=hidden,
                     intermediate_size=3 * hidden, num_heads=8, num_kv_heads=4,
                     vocab_size=1024)


def model_info(path: Path, spec: ModelSpec) -> dict:
    import mlx.core as mx

    params = nbytes = 0
    for file in sorted(path.glob("*.safetensors")):
        for value in mx.load(str(file)).values():
            params += value.size
            nbytes += value.nbytes
    config = json.loads((path / "config.json").read_text())
    return {"name": spec.name, "path": str(path), "parameters": params,
            "mib": nbytes / 2**20, "layers": spec.num_layers, "hidden": spec.hidden_size,
            "intermediate": spec.intermediate_size, "vocab_size": config["vocab_size"]}


# --- baseline: mlx-lm in a process of its own -------------------------------------------

def baseline_worker() -> None:
    """Serve timing jobs on stdin/stdout, one JSON line each: {"model"} first, then runs."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step

    model, _ = mlx_lm.load(json.loads(sys.stdin.readline())["model"])
    print("ready", flush=True)
    for line in sys.stdin:
        run = json.loads(line)
        arrivals: list[float] = []
        started = time.perf_counter()
        for _token, _ in generate_step(mx.array(run["prompt"]), model,
                                       max_tokens=run["max_tokens"]):
            arrivals.append(time.perf_counter())
        decode = (len(arrivals) - 1) / max(arrivals[-1] - arrivals[0], 1e-9)
        print(json.dumps({"ttft_s": arrivals[0] - started, "tokens": len(arrivals),
                          "decode_tok_s": decode}), flush=True)


class Baseline:
    """Single-process mlx-lm in a process of its own, measured like the ring processes."""

    def __init__(self, model: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--baseline-worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._ask({"model": str(model)})
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the baseline worker did not start")

    def _ask(self, job: dict) -> None:
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()

    def measure(self, run: Run) -> StreamTiming:
        self._ask(asdict(run))
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the baseline worker died")
        return StreamTiming(**json.loads(line))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


# --- rings ------------------------------------------------------------------------------

def concurrency_samples(url: str, vocab_size: int, streams: list[int], rep: int,
                        tokens: int) -> dict[int, float]:
    out = {}
    for n in streams:
        prompts = [random_prompt(vocab_size, 32, 8_000_000 + 1000 * rep + 10 * n + i)
                   for i in range(n)]
        out[n] = aggregate_decode_tok_s(concurrent_traces(url, prompts, tokens))
    return out


def concurrency_result(name: str, shards: int, samples: dict[int, list[float]]) -> Concurrency:
    single = median(samples[min(samples)])
    points = [ConcurrencyPoint(n, median(s), median(s) / single, s) for n, s in samples.items()]
    return Concurrency(name, shards, points, f"ratio to this ring's {min(samples)}-stream figure")


# --- derived figures and targets --------------------------------------------------------

def hop_overheads(rings: list[SingleStream]) -> dict[str, float]:
    one = next((r for r in rings if r.shards == 1), None)
    if one is None:
        return {}
    return {str(r.shards): (r.ms_per_token - one.ms_per_token) / r.shards
            for r in rings if r.shards > 1}


def baseline_concurrency(baseline: SingleStream, streams: list[int]) -> Concurrency:
    points = [ConcurrencyPoint(n, baseline.decode_tok_s, 1.0) for n in streams]
    return Concurrency("baseline", 0, points, "one process serves requests one after another "
                       "in arrival order: the single-stream figure, not measured")


def ring_by_shards(rings: list[SingleStream], shards: int) -> SingleStream | None:
    return next((r for r in rings if r.shards == shards), None)


def point(concurrency: list[Concurrency], shards: int, streams: int) -> ConcurrencyPoint | None:
    for c in concurrency:
        if c.shards == shards:
            return next((p for p in c.points if p.streams == streams), None)
    return None


def evaluate_targets(report: Report) -> list[Target]:
    base, rings, out = report.baseline, report.rings, []
    for shards, floor in ((2, 0.90), (3, 0.85)):
        ring = ring_by_shards(rings, shards)
        ratio = ring.decode_tok_s / base.decode_tok_s if ring else None
        out.append(Target(f"decode {shards}-shard / baseline", ratio, ">=", floor))
    long = str(max(int(k) for k in base.ttft_ms))
    for ring in rings:
        out.append(Target(f"TTFT {long}-token prompt, {ring.shards}-shard / baseline",
                          ring.ttft_ms[long] / base.ttft_ms[long], "<=", 1.10))
    for shards in (2, 3):
        out.append(Target(f"per-hop overhead, {shards} shards",
                          report.hop_ms.get(str(shards)), "<=", 0.5, "ms"))
    four, eight = point(report.concurrency, 2, 4), point(report.concurrency, 2, 8)
    out.append(Target("4 streams aggregate / 1 stream, 2-shard",
                      four.ratio_to_single if four else None, ">=", 2.5))
    out.append(Target("8 streams / 4 streams aggregate, 2-shard",
                      eight.aggregate_tok_s / four.aggregate_tok_s if four and eight else None,
                      ">", 1.0))
    return out


# --- output -----------------------------------------------------------------------------

def fmt_ttft(result: SingleStream) -> str:
    return ", ".join(f"{k} tok: {v:.1f} ms" for k, v in result.ttft_ms.items())


def results_table(report: Report) -> list[str]:
    base = report.baseline
    lengths = list(base.ttft_ms)
    head = (["config", "decode tok/s", "ms/token", "decode / base"]
            + [f"TTFT {n} ms" for n in lengths] + [f"TTFT {n} / base" for n in lengths]
            + ["per-hop ms"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in [base, *report.rings]:
        hop = report.hop_ms.get(str(r.shards))
        cells = ([r.name, f"{r.decode_tok_s:.1f}", f"{r.ms_per_token:.2f}",
                  f"{r.decode_tok_s / base.decode_tok_s:.2f}"]
                 + [f"{r.ttft_ms[n]:.1f}" for n in lengths]
                 + [f"{r.ttft_ms[n] / base.ttft_ms[n]:.2f}" for n in lengths]
                 + [f"{hop:.2f}" if hop is not None else "-"])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def concurrency_table(report: Report) -> list[str]:
    streams = [p.streams for p in report.concurrency[0].points]
    head = ["config"] + [f"{n} stream{'s' if n > 1 else ''}" for n in streams] + ["note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in report.concurrency:
        cells = [f"{p.aggregate_tok_s:.1f} ({p.ratio_to_single:.2f}x)" for p in c.points]
        lines.append("| " + " | ".join([c.name, *cells, c.note]) + " |")
    return lines


def targets_table(report: Report) -> list[str]:
    lines = ["| target | measured | required | status |", "|---|---|---|---|"]
    for t in report.targets:
        measured = f"{t.measured:.2f} {t.unit}" if t.measured is not None else "not measured"
        status = "n/a" if t.measured is None else "ok" if t.ok else "MISS"
        lines.append(f"| {t.name} | {measured} | {t.op} {t.threshold:.2f} {t.unit} | {status} |")
    return lines


def render(report: Report) -> str:
    m, mod = report.machine, report.model
    parts = [
        f"machine: {m['cpu']}, {m['cores']} cores, MLX {m['mlx']} on {m['mlx_device']}, "
        f"mlx-lm {m['mlx_lm']}, Python {m['python']}; 1-min load average "
        f"{m['loadavg_start']:.2f} before, {m['loadavg_end']:.2f} after"
        + (" (the machine was busy before we started: figures are skewed)"
           if m["loadavg_start"] > BUSY_LOAD else ""),
        f"model: {mod['name']}: {mod['parameters'] / 1e6:.1f} M parameters, "
        f"{mod['mib']:.1f} MiB",
        f"settings: {report.settings['tokens']} tokens decoded, median of "
        f"{report.settings['repeats']} after a warm-up",
        "", "### Single stream (ratios against the baseline)", "", *results_table(report),
        "", "### Concurrency: aggregate decode tok/s (ratio to 1 stream)", "",
        *concurrency_table(report), "", "### Targets", "", *targets_table(report),
    ]
    return "\n".join(parts)


def plot(report: Report, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written"
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    results = [report.baseline, *report.rings]
    left.bar([r.name for r in results], [r.decode_tok_s for r in results])
    left.set_ylabel("decode tok/s")
    left.set_title("single stream")
    for c in report.concurrency:
        right.plot([p.streams for p in c.points], [p.aggregate_tok_s for p in c.points],
                   marker="o", label=c.name)
    right.set_xlabel("concurrent streams")
    right.set_ylabel("aggregate tok/s")
    right.set_title("concurrency")
    right.legend()
    fig.tight_layout()
    fig.savefig(path)
    return f"plot written to {path}"


# --- main -------------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=384,
                   help="hidden size (intermediate 3x, 8 heads, 4 KV heads)")
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per stream")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-lengths", type=int_list, default=[32, 512])
    p.add_argument("--shards", type=int_list, default=[1, 2, 3])
    p.add_argument("--streams", type=int_list, default=[1, 2, 4, 8])
    p.add_argument("--concurrency-shards", type=int_list, default=[1, 2],
                   help="rings whose concurrency is measured")
    p.add_argument("--json", default="bench-results.json", help="where to write the results")
    p.add_argument("--plot", default=None, help="PNG path (needs matplotlib)")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "dnet-bench-models"))
    p.add_argument("--log-dir", default=None, help="keep the ring processes' logs here")
    p.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tokens < 2 or args.repeats < 1:
        p.error("--tokens must be at least 2 and --repeats at least 1")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_benchmark(args: argparse.Namespace, started: float) -> Report:
    """Every configuration is up at once and measured in turn, repetition by repetition,
    so a slow minute on a shared machine hits them all alike."""
    machine = machine_info()
    spec = model_spec(args.layers, args.hidden)
    model = cached_model(spec, cache_dir=Path(args.cache_dir))
    info = model_info(model, spec)
    log(f"model {info['name']}: {info['parameters'] / 1e6:.1f} M parameters, "
        f"{info['mib']:.1f} MiB, at {model}")
    runs = single_stream_plan(info["vocab_size"], args.prompt_lengths, args.repeats,
                              args.tokens)
    with contextlib.ExitStack() as stack:
        baseline = Baseline(model)
        stack.callback(baseline.close)
        rings = {}
        for shards in args.shards:
            log_dir = Path(args.log_dir) / f"ring{shards}" if args.log_dir else None
            ring = LocalRing(str(model), even_split(args.layers, shards), log_dir=log_dir)
            rings[shards] = stack.enter_context(ring)
            log(f"ring of {shards} up at {ring.url}")
        timings: dict[int, list[StreamTiming]] = {0: [], **{k: [] for k in rings}}
        for rep in range(-1, args.repeats):
            for run in (r for r in runs if r.rep == rep):
                timings[0].append(baseline.measure(run))
                for shards, ring in rings.items():
                    timings[shards].append(stream_completion(ring.url, run.prompt,
                                                             run.max_tokens))
            log(f"single-stream repetition {rep + 1} of {args.repeats} done"
                if rep >= 0 else "warm-up done")
        base = summarize("baseline", 0, runs, timings[0])
        singles = [summarize(f"ring-{k}", k, runs, timings[k]) for k in rings]
        samples: dict[int, dict[int, list[float]]] = {k: {} for k in args.concurrency_shards
                                                       if k in rings}
        for shards in samples:  # discarded warm-up
            concurrent_traces(rings[shards].url, [random_prompt(info["vocab_size"], 32, i)
                                                  for i in range(max(args.streams))],
                              CONCURRENCY_WARMUP_TOKENS)
        for rep in range(args.repeats):
            for shards in samples:
                for n, value in concurrency_samples(rings[shards].url, info["vocab_size"],
                                                    args.streams, rep, args.tokens).items():
                    samples[shards].setdefault(n, []).append(value)
            log(f"concurrency repetition {rep + 1} of {args.repeats} done")
    concurrency = [baseline_concurrency(base, args.streams)] + [
        concurrency_result(f"ring-{k}", k, v) for k, v in samples.items()]
    settings = {k: v for k, v in vars(args).items() if k != "baseline_worker"}
    machine["loadavg_end"] = os.getloadavg()[0]
    report = Report(machine, info, settings, base, singles, hop_overheads(singles),
                    concurrency)
    report.targets = evaluate_targets(report)
    report.elapsed_s = time.perf_counter() - started
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.baseline_worker:
        baseline_worker()
        return
    # SIGTERM unwinds like Ctrl-C, so LocalRing's context manager stops the shards.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    report = run_benchmark(args, started)
    print(render(report))
    Path(args.json).write_text(json.dumps(report.to_json(), indent=2))
    print(f"\nJSON written to {args.json}")
    if args.plot:
        print(plot(report, Path(args.plot)))
    print(f"elapsed: {report.elapsed_s:.0f} s")


if __name__ == "__main__":
    main()
