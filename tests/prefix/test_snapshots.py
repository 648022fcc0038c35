"""Restoring a prefix from blocks gives bit-for-bit the cache state an uncached prefill has.

Each model is built straight from mlx-lm's classes with random weights (no files): Llama
(KVCache), Gemma 3 (sliding-window RotatingKVCache next to KVCache) and Qwen3-Next (ArraysCache
linear attention next to KVCache). The prompt is prefilled in chunks of BLOCK tokens; the blocks
are cut as the chunks go; then a second run restores the first DEPTH blocks and prefills only
the rest. The last logits and the next decode steps must be identical.
"""

from __future__ import annotations

import random

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_map

from dnet.prefix.snapshots import LayerKind, chunk_slice, layer_kind, restore, snapshot

BLOCK = 16
PROMPT = 100  # 6 full chunks of 16 in the first 99 tokens, then 3 tokens, then the last


def _model(name: str):
    if name == "llama":
        from mlx_lm.models import llama as module

        args = dict(model_type="llama", hidden_size=64, num_hidden_layers=3,
                    intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    rms_norm_eps=1e-5, vocab_size=256)
    elif name == "gemma3_text":
        from mlx_lm.models import gemma3_text as module

        args = dict(model_type="gemma3_text", hidden_size=64, num_hidden_layers=4,
                    intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
                    head_dim=16, vocab_size=256, sliding_window=24, sliding_window_pattern=2,
                    query_pre_attn_scalar=16)
    else:
        from mlx_lm.models import qwen3_next as module

        args = dict(model_type="qwen3_next", hidden_size=64, num_hidden_layers=4,
                    intermediate_size=128, num_attention_heads=4, linear_num_value_heads=4,
                    linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                    linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
                    decoder_sparse_step=1, shared_expert_intermediate_size=64,
                    mlp_only_layers=[], moe_intermediate_size=32, rms_norm_eps=1e-6,
                    vocab_size=256, num_key_value_heads=2, rope_theta=10000.0,
                    partial_rotary_factor=0.5, max_position_embeddings=4096, head_dim=16,
                    full_attention_interval=2)
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(args))
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.3, model.parameters()))
    model.set_dtype(mx.float32)
    for _, m in model.named_modules():
        if isinstance(m, nn.RMSNorm):
            m.weight = 1.0 + 0.1 * mx.random.normal(m.weight.shape)
    mx.eval(model.parameters())
    return model


def _prefill(model, tokens, caches, start, cut):
    """Chunks of BLOCK from `start`, all but the last token; returns the parts cut per block."""
    parts = []
    end = len(tokens) - 1
    for i in range(start, end, BLOCK):
        chunk = tokens[i:min(i + BLOCK, end)]
        model(mx.array(chunk)[None], cache=caches)
        mx.eval([c.state for c in caches])
        if cut and len(chunk) == BLOCK:
            parts.append(([chunk_slice(c, BLOCK) for c in caches],
                          [snapshot(c) for c in caches]))
    return parts


def _decode(model, tokens, caches, steps=4):
    out = []
    y = tokens[-1:]
    for _ in range(steps):
        logits = model(mx.array(y)[None], cache=caches)[0, -1]
        mx.eval(logits)
        out.append(logits)
        y = [int(mx.argmax(logits).item())]
    return out


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "qwen3_next"])
@pytest.mark.parametrize("depth", [1, 3, 6])
def test_restored_prefix_continues_bit_for_bit(name: str, depth: int) -> None:
    model = _model(name)
    rng = random.Random(depth)
    tokens = [rng.randrange(256) for _ in range(PROMPT)]

    reference_caches = model.make_cache()
    parts = _prefill(model, tokens, reference_caches, 0, cut=True)
    assert len(parts) == (PROMPT - 1) // BLOCK
    reference = _decode(model, tokens, reference_caches)

    templates = model.make_cache()
    kinds = {layer_kind(c) for c in templates}
    assert None not in kinds
    caches = [
        restore(template, [parts[b][0][i] for b in range(depth)],
                parts[depth - 1][1][i] if layer_kind(template) is not LayerKind.SLICED
                else None, depth * BLOCK)
        for i, template in enumerate(templates)
    ]
    _prefill(model, tokens, caches, depth * BLOCK, cut=False)
    got = _decode(model, tokens, caches)
    for step, (a, b) in enumerate(zip(reference, got, strict=True)):
        assert mx.array_equal(a, b).item(), f"{name}: step {step} differs"


def test_a_block_is_a_copy_not_a_view_of_the_request_cache() -> None:
    from mlx_lm.models.cache import KVCache

    cache = KVCache()
    cache.update_and_fetch(mx.ones((1, 2, BLOCK, 8)), mx.ones((1, 2, BLOCK, 8)))
    part = chunk_slice(cache, BLOCK)
    cache.update_and_fetch(mx.zeros((1, 2, 1, 8)), mx.zeros((1, 2, 1, 8)))
    cache.keys[..., :BLOCK, :] = mx.zeros((1, 2, BLOCK, 8))  # the request's buffer moves on
    assert mx.array_equal(part.keys, mx.ones((1, 2, BLOCK, 8))).item()
