"""Writes tiny real models (mlx-lm's own classes, random weights) for profile tests.

Tests may import MLX; the planner may not. Each model is config.json plus safetensors files
laid out like a Hugging Face / MLX checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import deepseek_v2, llama, qwen2, qwen3

MODULES = {"qwen3": qwen3, "qwen2": qwen2, "llama": llama, "deepseek_v2": deepseek_v2}

QWEN3_CONFIG: dict[str, Any] = {
    "model_type": "qwen3",
    "num_hidden_layers": 3,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 96,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
QWEN2_CONFIG: dict[str, Any] = {
    "model_type": "qwen2",
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 80,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
LLAMA_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 24,
    "vocab_size": 72,
    "rms_norm_eps": 1e-6,
    "attention_bias": True,
    "tie_word_embeddings": False,
}
DEEPSEEK_CONFIG: dict[str, Any] = {
    "model_type": "deepseek_v2",
    "num_hidden_layers": 3,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "qk_nope_head_dim": 16,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "vocab_size": 64,
    "rope_scaling": {"factor": 1.0},
    "max_position_embeddings": 256,
}


def build_model(
    config: dict[str, Any], dtype: mx.Dtype, quant_bits: int | None = None
) -> nn.Module:
    module = MODULES[config["model_type"]]
    model = module.Model(module.ModelArgs.from_dict(config))
    model.set_dtype(dtype)
    if quant_bits is not None:
        nn.quantize(model, group_size=32, bits=quant_bits)
    mx.eval(model.parameters())
    return model


def write_model(
    directory: Path,
    config: dict[str, Any],
    dtype: mx.Dtype = mx.bfloat16,
    quant_bits: int | None = None,
    files: int = 1,
    with_index: bool = True,
) -> nn.Module:
    """Saves the model's weights over `files` safetensors files (plus an index when several)."""
    directory.mkdir(parents=True, exist_ok=True)
    model = build_model(config, dtype, quant_bits)
    weights = dict(tree_flatten(model.parameters()))
    names = sorted(weights)
    weight_map: dict[str, str] = {}
    for part in range(files):
        chunk = names[part::files]
        file_name = (
            "model.safetensors"
            if files == 1
            else f"model-{part + 1:05d}-of-{files:05d}.safetensors"
        )
        mx.save_safetensors(
            str(directory / file_name), {n: weights[n] for n in chunk}, metadata={"format": "mlx"}
        )
        weight_map.update(dict.fromkeys(chunk, file_name))
    if files > 1 and with_index:
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    stored = dict(config)
    if quant_bits is not None:
        stored["quantization"] = {"group_size": 32, "bits": quant_bits}
    (directory / "config.json").write_text(json.dumps(stored))
    return model
