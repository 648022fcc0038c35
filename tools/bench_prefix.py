"""Time to first token of a growing conversation, with and without the prefix cache, in one run.

Two local rings of the same generated model are up at once, alike but for the cache: one with
the default `--prefix-cache-bytes`, one with `--prefix-cache-bytes 0`. A conversation of
--turns turns replays on both, measured alternately turn by turn (which ring goes first
alternates too), so a slow minute on a shared machine hits both alike. Each turn's prompt is
the previous prompt, its answer and a new user message, as chat apps and agents resend the
whole conversation; it grows past 3,000 tokens by the eighth turn with the defaults.

Per turn: TTFT (sending the HTTP request to the first streamed token, `/v1/completions` with
token ids), the prompt tokens the cache supplied (`usage.prompt_tokens_details`), and the
ratio cached / uncached. Every repetition is a new conversation (fresh random ids), so no
repetition reuses another's blocks; figures are medians over --repeats, after a warm-up
request on each ring. Both rings must give the same answer at every turn (checked). The
issue's target: the last turn's TTFT with the cache at most a quarter of the one without.

The default model is shaped so that, as in real models, weight matmuls and not attention make
most of a long prompt's prefill: its MLP is 16x its hidden size (2 layers, hidden 384,
intermediate 6144), so at 3,000 tokens of context attention is about a fifth of a token's
compute (Qwen3-32B: under a tenth). Models shaped like the demo's (MLP 3x a small hidden
size; `--hidden 256 --intermediate 768 --layers 8`) spend most of a 3,000-token prefill in
attention, which the cache cannot shorten for the new tokens: the ratios are then higher.

Usage:
    uv run python tools/bench_prefix.py [--turns 8] [--system 600] [--user 230] [--answer 96]
        [--repeats 2] [--layers 2] [--hidden 384] [--intermediate 6144] [--shards 2]
        [--prefill-chunk 512]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import log, machine_info, model_info  # noqa: E402
from benchlib import median  # noqa: E402

from dnet.entry import PREFILL_CHUNK  # noqa: E402
from dnet.local_ring import LocalRing, even_split  # noqa: E402
from dnet.modelgen import ModelSpec, cached_model  # noqa: E402

FIRST_ORDINARY_TOKEN = 3  # ids 0-2 are the generated tokenizer's special tokens
TARGET = 0.25  # the last turn's TTFT with the cache over the one without, at most


@dataclass
class Answer:
    ttft_s: float
    tokens: list[int]
    cached_tokens: int


@dataclass
class Turn:
    turn: int
    prompt_tokens: int
    uncached_ms: float
    cached_ms: float
    cached_tokens: int  # what the cache supplied in the last repetition
    uncached_samples_ms: list[float] = field(default_factory=list)
    cached_samples_ms: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.cached_ms / self.uncached_ms


def stream(url: str, prompt: list[int], max_tokens: int, timeout_s: float = 900.0) -> Answer:
    """One streamed completion (EOS banned, so it has max_tokens tokens): its TTFT, its
    token ids and the prompt tokens the prefix cache supplied."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    tokens: list[int] = []
    first = cached = None
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body,
                      timeout=timeout_s) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk["choices"]:
                if choice.get("token_ids") and first is None:
                    first = time.perf_counter()
                tokens += choice.get("token_ids", [])
            if chunk.get("usage"):
                cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
    if first is None or cached is None or len(tokens) != max_tokens:
        raise RuntimeError(f"expected {max_tokens} tokens and a usage chunk; got "
                           f"{len(tokens)} tokens")
    return Answer(first - started, tokens, cached)


def words(vocab_size: int, length: int, rng: random.Random) -> list[int]:
    return [rng.randrange(FIRST_ORDINARY_TOKEN, vocab_size) for _ in range(length)]


def conversation(rings: dict[str, LocalRing], args: argparse.Namespace, vocab_size: int,
                 seed: int) -> list[dict[str, Answer]]:
    """One conversation on both rings, turn by turn; per turn, each ring's answer."""
    rng = random.Random(seed)
    prompt = words(vocab_size, args.system + args.user, rng)
    out = []
    for turn in range(args.turns):
        order = list(rings) if turn % 2 == 0 else list(reversed(rings))
        answers = {name: stream(rings[name].url, prompt, args.answer) for name in order}
        if answers["cached"].tokens != answers["uncached"].tokens:
            raise RuntimeError(f"turn {turn + 1}: the rings gave different answers")
        out.append(answers)
        log(f"  turn {turn + 1}: {len(prompt)} prompt tokens, TTFT "
            f"{answers['uncached'].ttft_s * 1000:.0f} ms without the cache, "
            f"{answers['cached'].ttft_s * 1000:.0f} ms with "
            f"({answers['cached'].cached_tokens} cached)")
        prompt = prompt + answers["cached"].tokens + words(vocab_size, args.user, rng)
    return out


def summarize(runs: list[list[dict[str, Answer]]], lengths: list[int]) -> list[Turn]:
    turns = []
    for t, length in enumerate(lengths):
        uncached = [run[t]["uncached"].ttft_s * 1000 for run in runs]
        cached = [run[t]["cached"].ttft_s * 1000 for run in runs]
        turns.append(Turn(t + 1, length, median(uncached), median(cached),
                          runs[-1][t]["cached"].cached_tokens, uncached, cached))
    return turns


def render(machine: dict, info: dict, args: argparse.Namespace, turns: list[Turn]) -> str:
    lines = [
        f"machine: {machine['cpu']}, {machine['cores']} cores, MLX {machine['mlx']} on "
        f"{machine['mlx_device']}; 1-min load average {machine['loadavg_start']:.2f} before, "
        f"{machine['loadavg_end']:.2f} after",
        f"model: {info['name']}: {info['parameters'] / 1e6:.1f} M parameters, "
        f"{info['mib']:.1f} MiB; {args.shards} shards per ring; prefill chunk "
        f"{args.prefill_chunk}; median of {args.repeats} conversation(s)",
        "", "| turn | prompt tokens | cached tokens | TTFT without cache ms | "
            "TTFT with cache ms | with / without |", "|---|---|---|---|---|---|"]
    for t in turns:
        lines.append(f"| {t.turn} | {t.prompt_tokens} | {t.cached_tokens} | "
                     f"{t.uncached_ms:.0f} | {t.cached_ms:.0f} | {t.ratio:.2f} |")
    last = turns[-1]
    status = "ok" if last.ratio <= TARGET else "MISS"
    lines += ["", f"last turn: with / without = {last.ratio:.2f} (target <= {TARGET:.2f}): "
                  f"{status}; its spread over repetitions: without "
                  f"{min(last.uncached_samples_ms):.0f}-{max(last.uncached_samples_ms):.0f} ms, "
                  f"with {min(last.cached_samples_ms):.0f}-{max(last.cached_samples_ms):.0f} ms"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--system", type=int, default=600, help="system prompt tokens")
    p.add_argument("--user", type=int, default=230, help="tokens of each user message")
    p.add_argument("--answer", type=int, default=96, help="tokens of each answer")
    p.add_argument("--repeats", type=int, default=2, help="conversations per ring")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=384, help="hidden size (8 heads, 4 KV heads)")
    p.add_argument("--intermediate", type=int, default=6144, help="MLP size")
    p.add_argument("--shards", type=int, default=2, help="shards per ring")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK)
    p.add_argument("--json", default="bench-prefix.json", help="where to write the results")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "dnet-bench-models"))
    p.add_argument("--log-dir", default=None, help="keep the ring processes' logs here")
    args = p.parse_args(argv)
    if args.turns < 1 or args.repeats < 1 or args.answer < 1:
        p.error("--turns, --repeats and --answer must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the rings stop
    started = time.perf_counter()
    machine = machine_info()
    spec = ModelSpec(arch="qwen3", dtype="bfloat16", num_layers=args.layers,
                     hidden_size=args.hidden, intermediate_size=args.intermediate, num_heads=8,
                     num_kv_heads=4, vocab_size=1024)
    model = cached_model(spec, cache_dir=Path(args.cache_dir))
    info = model_info(model, spec)
    log(f"model {info['name']}: {info['parameters'] / 1e6:.1f} M parameters at {model}")
    chunk = ["--prefill-chunk", str(args.prefill_chunk)]
    with contextlib.ExitStack() as stack:
        rings = {}
        for name, shard_args in (("uncached", ["--prefix-cache-bytes", "0"]), ("cached", [])):
            log_dir = Path(args.log_dir) / name if args.log_dir else None
            ring = LocalRing(str(model), even_split(args.layers, args.shards), log_dir=log_dir,
                             shard_args=shard_args, api_args=chunk)
            rings[name] = stack.enter_context(ring)
            log(f"{name} ring up at {ring.url}")
        warm = words(info["vocab_size"], 64, random.Random(-1))
        for ring in rings.values():
            stream(ring.url, warm, 4)
        runs = []
        for rep in range(args.repeats):
            log(f"conversation {rep + 1} of {args.repeats}")
            runs.append(conversation(rings, args, info["vocab_size"], seed=rep))
    lengths = [args.system + args.user + t * (args.answer + args.user)
               for t in range(args.turns)]
    turns = summarize(runs, lengths)
    machine["loadavg_end"] = os.getloadavg()[0]
    print(render(machine, info, args, turns))
    Path(args.json).write_text(json.dumps({
        "machine": machine, "model": info, "settings": vars(args),
        "turns": [{**asdict(t), "ratio": t.ratio} for t in turns],
        "target": {"last_turn_ratio_at_most": TARGET, "ok": turns[-1].ratio <= TARGET},
        "elapsed_s": time.perf_counter() - started}, indent=2))
    print(f"\nJSON written to {args.json}; elapsed {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
