"""Parameter counts per layer from a model's `config.json`, for the architectures mlx-lm ships.

The planner never loads weights, so the FLOPs a token costs and the size of its KV cache come
from config arithmetic. Byte sizes also come from here when no safetensors headers are at hand
(for example the published configs of models that are not downloaded); `profile_model` prefers
the headers for bytes because they include quantization scales and biases exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DENSE_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
SUPPORTED_ARCHITECTURES = DENSE_ARCHITECTURES | {"deepseek_v2"}


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one decoder layer: all it stores, and those one token multiplies through."""

    stored: int
    active: int


def _require(config: Mapping[str, Any], key: str) -> int:
    if key not in config:
        raise ValueError(f"config.json has no {key!r}, which the planner needs")
    return int(config[key])


def architecture(config: Mapping[str, Any]) -> str:
    model_type = str(config.get("model_type", ""))
    if model_type not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {supported}")
    return model_type


def head_dim(config: Mapping[str, Any]) -> int:
    hidden = _require(config, "hidden_size")
    heads = _require(config, "num_attention_heads")
    # mlx-lm's qwen2 always derives head_dim; llama and qwen3 honour an explicit one.
    if config.get("model_type") == "qwen2" or config.get("head_dim") is None:
        return hidden // heads
    return int(config["head_dim"])


def tied_embeddings(config: Mapping[str, Any]) -> bool:
    # Defaults follow mlx-lm's ModelArgs: llama and qwen2 tie unless told otherwise.
    default = architecture(config) in {"llama", "mistral", "qwen2"}
    return bool(config.get("tie_word_embeddings", default))


def _linear(inputs: int, outputs: int, bias: bool) -> int:
    return inputs * outputs + (outputs if bias else 0)


def _dense_attention_params(config: Mapping[str, Any]) -> int:
    hidden = _require(config, "hidden_size")
    heads = _require(config, "num_attention_heads")
    kv_heads = int(config.get("num_key_value_heads") or heads)
    dim = head_dim(config)
    model_type = architecture(config)
    qkv_bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
    out_bias = model_type != "qwen2" and bool(config.get("attention_bias", False))
    params = _linear(hidden, heads * dim, qkv_bias)
    params += 2 * _linear(hidden, kv_heads * dim, qkv_bias)
    params += _linear(heads * dim, hidden, out_bias)
    if model_type == "qwen3":
        params += 2 * dim  # q_norm and k_norm
    return params


def _mla_attention_params(config: Mapping[str, Any]) -> int:
    hidden = _require(config, "hidden_size")
    heads = _require(config, "num_attention_heads")
    rope = int(config.get("qk_rope_head_dim", 64))
    nope = int(config.get("qk_nope_head_dim", 128))
    value = int(config.get("v_head_dim", 128))
    kv_rank = int(config.get("kv_lora_rank", 512))
    q_rank = config.get("q_lora_rank", 1536)
    bias = bool(config.get("attention_bias", False))
    if q_rank is None:
        params = _linear(hidden, heads * (nope + rope), False)
    else:
        params = _linear(hidden, int(q_rank), bias) + int(q_rank)
        params += _linear(int(q_rank), heads * (nope + rope), False)
    params += _linear(hidden, kv_rank + rope, bias) + kv_rank
    params += _linear(kv_rank, heads * (nope + value), False)
    params += _linear(heads * value, hidden, bias)
    return params


def _gated_mlp_params(hidden: int, intermediate: int, bias: bool = False) -> int:
    return 2 * _linear(hidden, intermediate, bias) + _linear(intermediate, hidden, bias)


def _deepseek_is_moe_layer(config: Mapping[str, Any], index: int) -> bool:
    return (
        config.get("n_routed_experts") is not None
        and index >= int(config.get("first_k_dense_replace", 0))
        and index % int(config.get("moe_layer_freq", 1)) == 0
    )


def layer_params(config: Mapping[str, Any]) -> list[LayerParams]:
    """Stored and per-token active parameters of every decoder layer, in order."""
    model_type = architecture(config)
    hidden = _require(config, "hidden_size")
    layers = _require(config, "num_hidden_layers")
    norms = 2 * hidden
    if model_type in DENSE_ARCHITECTURES:
        mlp = _gated_mlp_params(
            hidden, _require(config, "intermediate_size"), bool(config.get("mlp_bias", False))
        )
        total = _dense_attention_params(config) + mlp + norms
        return [LayerParams(stored=total, active=total) for _ in range(layers)]

    attention = _mla_attention_params(config) + norms
    dense_mlp = _gated_mlp_params(hidden, _require(config, "intermediate_size"))
    expert = _gated_mlp_params(hidden, int(config.get("moe_intermediate_size", 1407)))
    routed = int(config.get("n_routed_experts") or 0)
    used = int(config.get("num_experts_per_tok") or 0)
    shared = int(config.get("n_shared_experts") or 0)
    router = routed * hidden
    result: list[LayerParams] = []
    for index in range(layers):
        if _deepseek_is_moe_layer(config, index):
            # A token only runs through its routed top-k experts plus the shared ones.
            stored = attention + router + (routed + shared) * expert
            active = attention + router + (used + shared) * expert
            result.append(LayerParams(stored=stored, active=active))
        else:
            result.append(LayerParams(stored=attention + dense_mlp, active=attention + dense_mlp))
    return result


def embedding_params(config: Mapping[str, Any]) -> int:
    return _require(config, "vocab_size") * _require(config, "hidden_size")


def head_params(config: Mapping[str, Any]) -> int:
    """Final norm plus lm_head; a tied head reuses the embedding, so only the norm is stored."""
    hidden = _require(config, "hidden_size")
    lm_head = 0 if tied_embeddings(config) else embedding_params(config)
    return hidden + lm_head


def head_flops_per_token(config: Mapping[str, Any]) -> float:
    # Tied or not, the projection to the vocabulary is one hidden x vocab matmul.
    return 2.0 * embedding_params(config)


def kv_elements_per_token_per_layer(config: Mapping[str, Any]) -> int:
    """Elements of K plus V one token adds to one layer's cache, as mlx-lm's caches store them."""
    model_type = architecture(config)
    heads = _require(config, "num_attention_heads")
    if model_type == "deepseek_v2":
        # MLA caches decompressed keys (nope + rope per head) and values per head.
        rope = int(config.get("qk_rope_head_dim", 64))
        nope = int(config.get("qk_nope_head_dim", 128))
        value = int(config.get("v_head_dim", 128))
        return heads * (nope + rope) + heads * value
    kv_heads = int(config.get("num_key_value_heads") or heads)
    return 2 * kv_heads * head_dim(config)
