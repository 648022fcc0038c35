"""Every supported model type on every kind of ring gives single-process mlx-lm's tokens.

In process and fast: Stage objects chained the way the shard runtime chains them
(tests/stage_ring.py), for every type x (1, 2, 3 shards, a multi-round ring), float and
quantized, greedy and seeded, with prompts longer than every sliding window, and with
weights streamed through a window. Real-process rings for a representative subset are in
tests/test_arch_ring.py. The cases are a table of (spec, layer lists), so another harness can
run the same matrix.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest

from dnet.modelgen import SLIDING_WINDOW, ModelSpec, model_config
from dnet.shard.groups import batchable
from dnet.shard.requests import RequestTable
from dnet.shard.tail import Tail
from dnet.stage import Stage
from dnet.structure import (
    PROVEN_MODEL_TYPES,
    ModelStructure,
    UnsupportedModelError,
    check_proven,
)
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


# The fast tier runs every type in its float precision on the multi-round split (several
# stages, non-contiguous layers, the tail mid-ring: every path the other splits take), one
# quantized model of each scheme (4-bit, 8-bit, mixed) and one streamed case; the rest of the
# matrix, which repeats those paths or mostly spends its time generating and quantizing
# models, runs in the slow tier.
FAST_FLOAT = {f"{arch}-{spec.dtype}-multi-round" for arch, spec in FLOAT_SPECS.items()}
FAST_QUANTIZED = {"qwen3_moe-q4-2-shards", "qwen2-q8-2-shards", "deepseek_v3-mixed_4_6-2-shards"}
FAST_STREAMED = {"qwen3_5-hybrid-first-streams"}


def tiered(names: list[str], fast: set[str] | None = None) -> list:
    """Parameters for `names`, those outside `fast` marked slow (None: all fast)."""
    return [pytest.param(name, marks=() if fast is None or name in fast else pytest.mark.slow)
            for name in names]


QUANTIZED = [name for name, (spec, _) in CASES.items() if spec.quant_bits or spec.quant_recipe]


@pytest.mark.parametrize("name", tiered([n for n in CASES if n not in QUANTIZED], FAST_FLOAT)
                         + tiered(QUANTIZED, FAST_QUANTIZED))
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


@pytest.mark.parametrize("name", tiered(list(STREAMED), FAST_STREAMED))
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


# One type per kind of cache a train merges (dense KV, latent MLA, linear-attention state,
# sliding windows with sinks, rotating windows) in the fast tier; the rest run slow.
FAST_TRAINS = {"qwen3", "deepseek_v3", "qwen3_5_moe", "gpt_oss", "gemma3_text"}


@pytest.mark.parametrize("arch", tiered(sorted(FLOAT_SPECS), FAST_TRAINS))
def test_four_requests_in_one_train_keep_their_own_tokens(arch: str, make_model) -> None:
    """Decode steps batched across 4 requests (merged caches on every stage, as a train's)
    give each request its single-request tokens; models that cannot batch exactly never do."""
    model = make_model(FLOAT_SPECS[arch])
    ring = StageRing(model, SPLITS["2-shards"])
    try:
        if not batchable(ring.stages[0].cache_templates):  # sliding windows: one per frame
            tail = Tail(ring.stages[-1], RequestTable())
            assert tail.scheduler.max_batch == 1
            return
        rng = random.Random(arch)
        prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 40, 17, 9)]
        references = [reference_tokens(model, p, MAX_TOKENS, ignore_eos=True) for p in prompts]
        for reference in references:
            assert_diverse(reference)
        started = [ring.prefill(prompt, temperature=0.0) for prompt in prompts]
        rest = ring.decode_batched([request for request, _ in started],
                                   [token for _, token in started], MAX_TOKENS - 1)
        for (_, first), tokens, reference in zip(started, rest, references, strict=True):
            assert [first, *tokens] == reference
    finally:
        ring.close()


@pytest.mark.parametrize("arch", ["qwen3_5", "gemma3_text", "deepseek_v3"])
def test_replay_on_a_re_planned_ring_continues_identically(arch: str, make_model) -> None:
    """What the entry does when a node dies: the prompt and the tokens so far run again, in
    the same steps, on the new ring; caches of every kind come back bit for bit."""
    model = make_model(FLOAT_SPECS[arch])
    prompt = prompts_for(model, arch)[1]
    reference = reference_tokens(model, prompt, MAX_TOKENS, ignore_eos=True)
    assert_diverse(reference)
    old = StageRing(model, SPLITS["3-shards"])
    request, token = old.prefill(prompt, temperature=0.0)
    generated = [token]
    for _ in range(5):
        generated.append(old.step(request, [generated[-1]], sample=True))
    old.close()  # the node is gone, and every cache with it
    new = StageRing(model, SPLITS["multi-round"])
    request, token = new.prefill(prompt, temperature=0.0)
    assert token == generated[0]
    for i, previous in enumerate(generated[:-1]):
        assert new.step(request, [previous], sample=True) == generated[i + 1]
    while len(generated) < MAX_TOKENS:
        token = new.step(request, [generated[-1]], sample=True)
        generated.append(token)
    new.close()
    assert generated == reference


def test_unproven_types_are_refused_naming_the_proven_ones(make_model, tmp_path) -> None:
    model = tmp_path / "model"
    shutil.copytree(make_model(FLOAT_SPECS["qwen3"]), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported: dnet runs "
                                                    ".*gemma4_text.*qwen3_next"):
        Stage(model, [0, 1])
    # Types mlx-lm runs with a proven type's code are that code.
    assert check_proven({"model_type": "kimi_k2"}) == "kimi_k2"


def test_layers_fed_by_other_layers_are_refused_not_computed_wrong() -> None:
    """Gemma 4's small variants give layers per-layer embeddings and other layers' keys and
    values; a stage cannot replay those, so loading says so."""
    from dnet.model_facts import skeleton

    config = model_config(FLOAT_SPECS["gemma4_text"], 512)
    for variant in ({"hidden_size_per_layer_input": 16}, {"num_kv_shared_layers": 3}):
        with pytest.raises(UnsupportedModelError, match="inputs computed by other layers"):
            ModelStructure(skeleton({**config, **variant}))
