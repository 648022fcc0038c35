"""The prefix cache on a ring, in one process: a conversation's next turn prefills only what is
new on every shard, and the tokens stay exactly mlx-lm's.

Real shard runtimes and a real entry (tests/inprocess.py) on generated models, prefilling in
chunks of BLOCK tokens; every reference is single-process mlx-lm's generate_step with the
same prefill_step_size. Each turn runs on a ring with the cache and on one without it (both
up at once), and `cached_tokens` says how much of the prompt the cache supplied.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from dnet.proto import dnet_ring_pb2 as pb
from tests.conftest import FLOAT_SPECS, reference_tokens
from tests.inprocess import InProcessRing, sampling

BLOCK = 16
VOCAB = 512
TWO = [[0, 1, 2, 3], [4, 5, 6, 7]]
MULTI_ROUND = [[0, 1, 6], [2, 3, 7], [4, 5]]  # the tail (layer 7) in the middle of the ring


def words(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(length)]


def assert_diverse(reference: list[int]) -> None:
    # A broken ring can still "match" a reference that repeats one token.
    assert len(set(reference)) >= max(4, len(reference) // 3), reference


def full_blocks(prompt_len: int) -> int:
    """Blocks a prompt's prefill leaves: full chunks of all but its last token."""
    return (prompt_len - 1) // BLOCK


def run(ring: InProcessRing, prompt: list[int], max_tokens: int,
        **fields: Any) -> tuple[list[int], int]:
    """A completion's token ids and the prompt tokens the prefix cache supplied."""
    tokens = asyncio.run(ring.tokens(prompt, sampling(len(prompt), max_tokens, **fields)))
    return [t.token for t in tokens], tokens[0].cached_tokens


def start(inprocess_ring, layers: list[list[int]], **options: Any) -> InProcessRing:
    return inprocess_ring(layers, prefill_chunk=BLOCK, **options)


def turns(model: Path, rings: list[InProcessRing], count: int, *, text: int,
          first: int = 40, user: int = 21, answer: int = 9,
          **fields: Any) -> list[tuple[int, ...]]:
    """A conversation of `count` turns: each prompt is the previous prompt, its answer and a
    new user message. Every ring must give mlx-lm's tokens; returns, per turn, the previous
    prompt's length, what each ring reused, and the answer."""
    reference_args = dict(fields)
    reference_args.pop("repetition_context_size", None)
    prompt = words(first, text)
    previous = 0
    out = []
    for turn in range(count):
        reference = reference_tokens(model, prompt, answer, ignore_eos=True,
                                     prefill_step_size=BLOCK, **reference_args)
        assert_diverse(reference)
        reused = []
        for ring in rings:
            got, cached = run(ring, prompt, answer, **fields)
            assert got == reference, f"turn {turn}: {len(prompt)} prompt tokens"
            reused.append(cached)
        out.append((previous, *reused))
        previous = len(prompt)
        prompt = prompt + reference + words(user, text * 100 + turn)
    for ring in rings:
        ring.wait_idle()
    return out


def expected_reuse(previous_prompt: int) -> int:
    """What a turn reuses: the full blocks of the previous turn's prompt (answers are decode
    steps, never cached)."""
    return full_blocks(previous_prompt) * BLOCK if previous_prompt else 0


SAMPLINGS = {"greedy": {}, "seeded": {"temperature": 0.8, "top_p": 0.9, "seed": 7}}


@pytest.mark.parametrize("how", list(SAMPLINGS))
@pytest.mark.parametrize("layers", [pytest.param(TWO, marks=pytest.mark.slow), MULTI_ROUND],
                         ids=["2-shards", "multi-round"])  # the multi-round ring is the harder
def test_a_growing_conversation_gives_the_same_tokens_with_and_without_the_cache(
        inprocess_ring, qwen3_model: Path, layers: list[list[int]], how: str) -> None:
    cached = start(inprocess_ring, layers)
    uncached = start(inprocess_ring, layers, prefix_cache_bytes=0)
    for previous, with_cache, without in turns(qwen3_model, [cached, uncached], 4, text=1,
                                               **SAMPLINGS[how]):
        assert with_cache == expected_reuse(previous) and without == 0
    stats = [r.prefix_stats for r in cached.runtimes()]
    assert all(s.restored_blocks > 0 for s in stats)
    assert all(s.nbytes == 0 and s.lookups > 0 for s in (r.prefix_stats
                                                          for r in uncached.runtimes()))


@pytest.mark.parametrize("how", list(SAMPLINGS))
def test_conversations_sharing_a_system_prompt_reuse_it_and_store_it_once(
        inprocess_ring, qwen3_model: Path, how: str) -> None:
    ring = start(inprocess_ring, MULTI_ROUND)
    uncached = start(inprocess_ring, MULTI_ROUND, prefix_cache_bytes=0)
    system = words(40, seed=2)  # two full blocks, then 8 tokens
    reused = []
    for i in range(3):
        prompt = system + words(20, seed=20 + i)  # 60 tokens: 3 blocks each
        reference = reference_tokens(qwen3_model, prompt, 10, ignore_eos=True,
                                     prefill_step_size=BLOCK, **SAMPLINGS[how])
        assert_diverse(reference)
        got, cached = run(ring, prompt, 10, **SAMPLINGS[how])
        assert got == reference == run(uncached, prompt, 10, **SAMPLINGS[how])[0]
        reused.append(cached)
    assert reused == [0, 2 * BLOCK, 2 * BLOCK]
    # Two shared blocks and one of each conversation's own: 5 blocks, not 9, on every shard.
    assert [r.prefix_stats.blocks for r in ring.runtimes()] == [5, 5, 5]
    ring.wait_idle()


def test_penalties_see_the_reused_prompt(inprocess_ring, qwen3_model: Path) -> None:
    # The repetition penalty looks back over the last 20 tokens; the prompts below end 5
    # tokens after a block boundary, so 15 of them are reused and travel in the opening.
    ring = start(inprocess_ring, TWO)
    penalties = {"repetition_penalty": 1.8, "repetition_context_size": 20}
    first = words(3 * BLOCK + 5, seed=3)
    run(ring, first, 4)
    second = first[:3 * BLOCK] + words(5, seed=4)
    reference = reference_tokens(qwen3_model, second, 16, ignore_eos=True,
                                 prefill_step_size=BLOCK, repetition_penalty=1.8)
    assert_diverse(reference)
    assert reference != reference_tokens(qwen3_model, second, 16, ignore_eos=True,
                                         prefill_step_size=BLOCK)  # the penalty matters
    got, cached = run(ring, second, 16, **penalties)
    assert cached == 3 * BLOCK and got == reference
    ring.wait_idle()


def test_prompt_scoring_never_reuses_a_prefix(inprocess_ring) -> None:
    ring = start(inprocess_ring, TWO)
    prompt = words(50, seed=5)
    run(ring, prompt, 2)
    lookups = [r.prefix_stats.lookups for r in ring.runtimes()]
    tokens = asyncio.run(ring.tokens(prompt, sampling(len(prompt), 2, prompt_logprobs=True)))
    assert tokens[0].cached_tokens == 0
    assert len(tokens[0].prompt_logprobs) == len(prompt) - 1  # every token passed the tail
    assert [r.prefix_stats.lookups for r in ring.runtimes()] == lookups  # none was asked
    ring.wait_idle()


def test_concurrent_requests_riding_trains_reuse_their_prefixes(
        inprocess_ring, qwen3_model: Path) -> None:
    ring = start(inprocess_ring, MULTI_ROUND)
    system = words(2 * BLOCK + 3, seed=6)
    prompts = [system + words(9 + 4 * i, seed=60 + i) for i in range(5)]
    lengths = [10 + 3 * i for i in range(5)]
    run(ring, system + [7, 8], 2)  # the system prompt's blocks, cached

    async def all_of() -> list[list[pb.Token]]:
        return await asyncio.gather(*[ring.tokens(p, sampling(len(p), n))
                                      for p, n in zip(prompts, lengths, strict=True)])

    results = asyncio.run(all_of())
    for prompt, length, tokens in zip(prompts, lengths, results, strict=True):
        reference = reference_tokens(qwen3_model, prompt, length, ignore_eos=True,
                                     prefill_step_size=BLOCK)
        assert [t.token for t in tokens] == reference
        assert tokens[0].cached_tokens == 2 * BLOCK
    ring.wait_idle()


def test_eviction_under_a_small_budget_keeps_every_answer_right(
        inprocess_ring, qwen3_model: Path) -> None:
    # The generated model keeps 1 KiB of KV per token on a shard of 4 layers: a block of 16
    # tokens is 16.25 KiB with its bookkeeping, so 50 kB holds three blocks.
    capacity = 50_000
    ring = start(inprocess_ring, TWO, prefix_cache_bytes=capacity)
    base = words(3 * BLOCK + 2, seed=8)
    run(ring, base, 2)
    assert [r.prefix_stats.blocks for r in ring.runtimes()] == [3, 3]
    # Four requests at once: one reusing the cached prefix, three bringing 3 blocks each
    # that push it out; pinned blocks stay until their request has restored them.
    prompts = [base[:-2] + words(6, seed=80)] + [words(3 * BLOCK + 2, seed=81 + i)
                                                  for i in range(3)]

    async def all_of() -> list[list[pb.Token]]:
        return await asyncio.gather(*[ring.tokens(p, sampling(len(p), 12)) for p in prompts])

    results = asyncio.run(all_of())
    for prompt, tokens in zip(prompts, results, strict=True):
        assert [t.token for t in tokens] == reference_tokens(
            qwen3_model, prompt, 12, ignore_eos=True, prefill_step_size=BLOCK)
    ring.wait_idle()
    for runtime in ring.runtimes():
        stats = runtime.prefix_stats
        assert stats.nbytes <= capacity and stats.blocks <= 3
    # Still a working cache: a new prompt's blocks push the old ones out and are reused.
    fresh = words(3 * BLOCK + 2, seed=90)
    run(ring, fresh, 2)
    assert run(ring, fresh[:-1] + [9, 9], 2)[1] == 3 * BLOCK
    ring.wait_idle()


def test_a_replan_keeps_the_cache_of_kept_layers_and_drops_moved_ones(
        inprocess_ring, qwen3_model: Path) -> None:
    ring = start(inprocess_ring, TWO, recover=True)
    prompt = words(45, seed=9)
    for step in ("first", "same layers", "new layers", "again"):
        if step == "same layers":
            ring.replan()  # a new epoch; every runtime keeps its layers and cache
        elif step == "new layers":
            ring.replan([[0, 1, 2], [3, 4, 5, 6, 7]])
        reference = reference_tokens(qwen3_model, prompt, 8, ignore_eos=True,
                                     prefill_step_size=BLOCK)
        got, cached = run(ring, prompt, 8)
        assert got == reference, step
        assert cached == {"first": 0, "same layers": 2 * BLOCK, "new layers": 0,
                          "again": 2 * BLOCK}[step], step
    ring.wait_idle()


def test_a_node_killed_between_turns_is_replaced_and_the_answers_stay_right(
        inprocess_ring, qwen3_model: Path) -> None:
    ring = start(inprocess_ring, MULTI_ROUND, recover=True)
    prompt = words(45, seed=10)
    reference = reference_tokens(qwen3_model, prompt, 8, ignore_eos=True,
                                 prefill_step_size=BLOCK)
    assert run(ring, prompt, 8) == (reference, 0)
    assert run(ring, prompt, 8) == (reference, 2 * BLOCK)
    ring.kill(1)
    ring.replan()  # a new shard for the dead one's layers, with an empty cache
    assert run(ring, prompt, 8) == (reference, 0)  # every shard must agree: none reused
    assert run(ring, prompt, 8) == (reference, 2 * BLOCK)
    ring.wait_idle()


def test_a_request_replayed_after_a_death_mid_answer_looks_its_prefix_up_again(
        inprocess_ring, qwen3_model: Path) -> None:
    ring = start(inprocess_ring, MULTI_ROUND, recover=True)
    prompt = words(45, seed=11)
    reference = reference_tokens(qwen3_model, prompt, 30, ignore_eos=True,
                                 prefill_step_size=BLOCK)
    assert_diverse(reference)
    run(ring, prompt, 2)

    async def die_and_replay() -> tuple[list[int], int]:
        got: list[int] = []
        cached = -1
        async for token in ring.stream(prompt, 30):
            got.append(token.token)
            if len(got) == 1:
                cached = token.cached_tokens
            if len(got) == 8:
                ring.kill(2)
                await asyncio.to_thread(ring.replan)
        return got, cached

    assert asyncio.run(die_and_replay()) == (reference, 2 * BLOCK)
    ring.wait_idle()


@pytest.mark.parametrize("arch", ["qwen3_5", "gemma3_text"])
def test_hybrid_and_sliding_window_models_reuse_exactly(inprocess_ring, make_model,
                                                       arch: str) -> None:
    # qwen3_5 mixes linear-attention layers (ArraysCache state: reusable only where a
    # snapshot was kept, the previous prompt's last block) with full attention; gemma3_text
    # mixes sliding windows of 16 tokens (RotatingKVCache) with full attention.
    model = make_model(FLOAT_SPECS[arch])
    cached = start(inprocess_ring, TWO, model=model)
    uncached = start(inprocess_ring, TWO, model=model, prefix_cache_bytes=0)
    for previous, with_cache, without in turns(model, [cached, uncached], 3, text=12):
        assert with_cache == expected_reuse(previous) and without == 0
    # Another conversation sharing only the first block: the state layers kept snapshots at
    # each turn's last full block (tokens 32, 64, 96), not at 16, so the hybrid model starts
    # from scratch; the sliding-window model reuses the block.
    other = words(40, seed=12)[:BLOCK] + words(20, seed=13)
    reference = reference_tokens(model, other, 8, ignore_eos=True, prefill_step_size=BLOCK)
    got, reused = run(cached, other, 8)
    assert got == reference
    assert reused == (0 if arch == "qwen3_5" else BLOCK)
    cached.wait_idle()


def test_shards_streaming_their_weights_reuse_prefixes_too(inprocess_ring,
                                                          qwen3_model: Path) -> None:
    # Windows of 1 and 2 layers: the weights stream from disk, the caches stay resident.
    cached = start(inprocess_ring, TWO, windows=[1, 2])
    for previous, reused in turns(qwen3_model, [cached], 3, text=14):
        assert reused == expected_reuse(previous)
