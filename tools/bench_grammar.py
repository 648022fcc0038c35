"""What a grammar costs per token at the tail: constrained against unconstrained decoding of the
same model, interleaved in one run, plus the mask's own cost on fixed logits.

A decode step here is what the tail does per token: the model's forward pass for one token,
then TokenSampler.sample and .describe (dnet/sampling.py), which with a grammar compute
llguidance's token mask, apply it and advance the matcher. The default model is a small
random Qwen3 with the real Qwen3 vocabulary (151,936 tokens: the mask's cost grows with the
vocabulary, the forward pass with the model; on a real model the ratio is much closer to 1).

Usage: uv run python tools/bench_grammar.py [--model DIR] [--steps 200] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
from mlx_lm import load  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from dnet.api import constraints  # noqa: E402
from dnet.proto import dnet_ring_pb2 as pb  # noqa: E402
from dnet.sampling import TokenSampler, grammar_tokenizer  # noqa: E402
from dnet.tokenizer import load_chat_tokenizer  # noqa: E402

# Long answers: an array of records, so the grammar stays open for the whole run.
SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}}},
    "required": ["name", "age", "tags"], "additionalProperties": False}}


def default_model() -> Path:
    from dnet.modelgen import cached_model, default_cache_dir
    from tests.api_support import fetch_qwen3_tokenizer, qwen3_vocab_spec

    cache = default_cache_dir()
    return cached_model(qwen3_vocab_spec(fetch_qwen3_tokenizer(cache)), cache_dir=cache)


def decode_seconds_per_token(model, prompt: list[int], make: Callable[[], TokenSampler],
                             eos: set[int], steps: int) -> float:
    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)[:, -1, :]
    sampler = make()
    started = time.perf_counter()
    for _ in range(steps):
        token, logprobs = sampler.sample(logits)
        sample = sampler.describe(token, logprobs)
        if sample.grammar_done or sample.token in eos:
            sampler = make()  # a new answer on the same cache: the grammar starts again
        logits = model(mx.array([[sample.token]]), cache=cache)[:, -1, :]
    mx.eval(logits)
    return (time.perf_counter() - started) / steps


def mask_seconds(make: Callable[[], TokenSampler], vocab: int, steps: int) -> float:
    """sample + describe alone on fixed logits (greedy), per token."""
    logits = mx.random.normal((1, vocab), key=mx.random.key(0))
    mx.eval(logits)
    sampler = make()
    started = time.perf_counter()
    for _ in range(steps):
        sample = sampler.describe(*sampler.sample(logits))
        if sample.grammar_done:
            sampler = make()
    return (time.perf_counter() - started) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    model_dir = args.model or default_model()
    model, _ = load(str(model_dir))
    tokenizer = load_chat_tokenizer(model_dir)
    vocab = int(model.args.vocab_size)
    prompt = tokenizer.encode("<|im_start|>user\nList some people.<|im_end|>\n"
                              "<|im_start|>assistant\n")
    grammar = constraints.json_grammar(tokenizer, prompt, "normal", SCHEMA, "schema")
    grammar_tokenizer(model_dir, vocab)  # built once per model, as at the tail

    def sampler(with_grammar: bool) -> Callable[[], TokenSampler]:
        params = pb.SamplingParams(temperature=0.0, top_p=1.0, max_tokens=10**6,
                                   grammar=grammar if with_grammar else "")
        return lambda: TokenSampler(params, vocab, lambda: grammar_tokenizer(model_dir, vocab))

    eos = set(tokenizer.eos_token_ids)
    decode_seconds_per_token(model, prompt, sampler(True), eos, 20)  # warm up
    free, bound, free_mask, bound_mask = [], [], [], []
    for _ in range(args.reps):  # interleaved: a slow minute hits both alike
        free.append(decode_seconds_per_token(model, prompt, sampler(False), eos, args.steps))
        bound.append(decode_seconds_per_token(model, prompt, sampler(True), eos, args.steps))
        free_mask.append(mask_seconds(sampler(False), vocab, args.steps))
        bound_mask.append(mask_seconds(sampler(True), vocab, args.steps))
    f, b = statistics.median(free), statistics.median(bound)
    fm, bm = statistics.median(free_mask), statistics.median(bound_mask)
    print(f"model {model_dir.name}: vocabulary {vocab}, {args.steps} steps x {args.reps}")
    print("| decoding | ms/token | ratio |")
    print("|---|---|---|")
    print(f"| unconstrained | {f * 1e3:.2f} | 1.00 |")
    print(f"| JSON schema grammar | {b * 1e3:.2f} | {b / f:.2f} |")
    print(f"sampling alone (fixed logits): {fm * 1e6:.0f} us unconstrained, "
          f"{bm * 1e6:.0f} us with the grammar: the mask costs {(bm - fm) * 1e6:.0f} us/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
