"""Every supported model type on every kind of ring gives single-process mlx-lm's tokens.

In process and fast: Stage objects chained the way the shard runtime chains them
(tests/stage_ring.py), for every type x (1, 2, 3 shards, a multi-round ring), float and
quantized, greedy and seeded, with prompts longer than every sliding window, and with
weights streamed through a window. Real-process rings for a representative subset are in
tests/test_arch_ring.py. The cases are a table of (spec, layer lists), so another harness can
run the same matrix.
"""

from __future__ import annotations

import random

import pytest

from dnet.modelgen import SLIDING_WINDOW, ModelSpec
from dnet.structure import PROVEN_MODEL_TYPES
from tests.conftest import FLOAT_SPECS, QUANT_SPECS, chat_prompt_ids, reference_tokens
from tests.stage_ring import StageRing

MAX_TOKENS = 16
PROMPT_TOKENS = 3 * SLIDING_WINDOW  # longer than every sliding window of the test models

SPLITS = {
    "1-shard": [list(range(8))],
    "2-shards": [[0, 1, 2, 3], [4, 5, 6, 7]],
    "3-shards": [[0, 1, 2], [3, 4, 5], [6, 7]],
    # Two rounds; the tail (layer 7) sits in the middle of the ring order.
    "multi-round": [[0, 1, 6], [2, 3, 7], [4, 5]],
}

CASES: dict[str, tuple[ModelSpec, list[list[int]]]] = {
    **{f"{arch}-{spec.dtype}-{split}": (spec, layers)
       for arch, spec in FLOAT_SPECS.items() for split, layers in SPLITS.items()},
    **{f"{arch}-{spec.quant_recipe or f'q{spec.quant_bits}'}-2-shards": (spec, SPLITS["2-shards"])
       for arch, spec in QUANT_SPECS.items()},
}

# (spec, layer lists, windows): weights streamed through a window smaller than the layers held.
STREAMED = {
    "qwen3_moe-both-stream": (FLOAT_SPECS["qwen3_moe"], [[0, 1, 4, 5], [2, 3, 6, 7]], [1, 2]),
    "qwen3_5-hybrid-first-streams": (FLOAT_SPECS["qwen3_5"], [[0, 1, 2, 6, 7], [3, 4, 5]],
                                     [2, None]),
    "gpt_oss-window-second-streams": (FLOAT_SPECS["gpt_oss"], [[0, 1, 2], [3, 4, 5, 6, 7]],
                                      [None, 3]),
    "deepseek_v3-q4-streams": (QUANT_SPECS["deepseek_v3"], [list(range(8))], [3]),
}

SEEDED = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "min_p": 0.02, "seed": 1234}


def assert_diverse(reference: list[int]) -> None:
    # A broken ring can still "match" a reference that repeats one token.
    assert len(set(reference)) >= max(4, len(reference) // 3), reference


def prompts_for(model, name: str) -> list[list[int]]:
    rng = random.Random(name)
    return [chat_prompt_ids(model, "What is 2+2?"),
            [rng.randrange(3, 500) for _ in range(PROMPT_TOKENS)]]


def test_every_proven_type_is_in_the_matrix() -> None:
    assert set(FLOAT_SPECS) == set(QUANT_SPECS) == PROVEN_MODEL_TYPES
    assert {spec.arch for spec, _ in CASES.values()} == PROVEN_MODEL_TYPES


@pytest.mark.parametrize("name", list(CASES))
def test_ring_of_stages_matches_mlx_lm(name: str, make_model) -> None:
    spec, layer_lists = CASES[name]
    model = make_model(spec)
    ring = StageRing(model, layer_lists)
    try:
        for prompt in prompts_for(model, name):
            reference = reference_tokens(model, prompt, MAX_TOKENS, ignore_eos=True)
            assert_diverse(reference)
            assert ring.generate(prompt, MAX_TOKENS, temperature=0.0) == reference
        if name.endswith("multi-round"):
            seed = SEEDED["seed"]
            sampling = {k: v for k, v in SEEDED.items() if k != "seed"}
            prompt = prompts_for(model, name)[1]
            reference = reference_tokens(model, prompt, MAX_TOKENS, ignore_eos=True, seed=seed,
                                         **sampling)
            assert_diverse(reference)
            assert ring.generate(prompt, MAX_TOKENS, **SEEDED) == reference
    finally:
        ring.close()


@pytest.mark.parametrize("name", list(STREAMED))
def test_streamed_weights_give_the_same_tokens(name: str, make_model) -> None:
    spec, layer_lists, windows = STREAMED[name]
    model = make_model(spec)
    ring = StageRing(model, layer_lists, windows)
    try:
        assert [stage.streaming for stage in ring.stages] == [w is not None for w in windows]
        for prompt in prompts_for(model, name):
            reference = reference_tokens(model, prompt, MAX_TOKENS, ignore_eos=True)
            assert_diverse(reference)
            assert ring.generate(prompt, MAX_TOKENS, temperature=0.0) == reference
    finally:
        ring.close()
