"""profile_model against config arithmetic and against mlx-lm's real models and caches."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from planner import profile_from_config, profile_model, read_safetensors_header
from planner.model_profile import ModelProfile
from tests.planner.model_files import (
    DEEPSEEK_CONFIG,
    LLAMA_CONFIG,
    QWEN2_CONFIG,
    QWEN3_CONFIG,
    write_model,
)

CASES = [
    ("qwen3-bf16", QWEN3_CONFIG, mx.bfloat16, 2),
    ("qwen2-bf16", QWEN2_CONFIG, mx.bfloat16, 2),
    ("llama-f16", LLAMA_CONFIG, mx.float16, 2),
    ("deepseek-f32", DEEPSEEK_CONFIG, mx.float32, 4),
]


def assert_same_profile(actual: ModelProfile, expected: ModelProfile) -> None:
    assert actual.num_layers == expected.num_layers
    assert actual.layer_bytes == expected.layer_bytes
    assert actual.embedding_bytes == expected.embedding_bytes
    assert actual.head_bytes == expected.head_bytes
    assert actual.tied_embeddings == expected.tied_embeddings
    assert actual.kv_bytes_per_token_per_layer == expected.kv_bytes_per_token_per_layer
    assert actual.layer_flops_per_token == expected.layer_flops_per_token
    assert actual.head_flops_per_token == expected.head_flops_per_token


def measured_kv_bytes_per_token(model: object, tokens: int = 5) -> list[int]:
    """Bytes mlx-lm's own cache holds per token, layer by layer, after a short prompt."""
    cache = make_prompt_cache(model)
    model(mx.array([list(range(1, tokens + 1))]), cache=cache)
    sizes = []
    for layer_cache in cache:
        keys, values = layer_cache.keys_and_values()
        assert keys.shape[2] == tokens
        sizes.append((keys.nbytes + values.nbytes) // tokens)
    return sizes


@pytest.mark.parametrize(("label", "config", "dtype", "dtype_bytes"), CASES)
def test_headers_match_config_arithmetic(
    tmp_path: Path, label: str, config: dict, dtype: mx.Dtype, dtype_bytes: int
) -> None:
    write_model(tmp_path / label, config, dtype)
    assert_same_profile(
        profile_model(tmp_path / label), profile_from_config(config, dtype_bytes, name=label)
    )


@pytest.mark.parametrize(("label", "config", "dtype", "dtype_bytes"), CASES)
def test_kv_bytes_match_mlx_lm_cache(
    tmp_path: Path, label: str, config: dict, dtype: mx.Dtype, dtype_bytes: int
) -> None:
    model = write_model(tmp_path / label, config, dtype)
    profile = profile_model(tmp_path / label)
    measured = measured_kv_bytes_per_token(model)
    assert measured == [profile.kv_bytes_per_token_per_layer] * profile.num_layers


def test_layer_bytes_are_the_sum_of_each_layers_tensors(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m", QWEN3_CONFIG, mx.bfloat16)
    profile = profile_model(tmp_path / "m")
    weights = dict(tree_flatten(model.parameters()))
    for index in range(QWEN3_CONFIG["num_hidden_layers"]):
        prefix = f"model.layers.{index}."
        expected = sum(v.nbytes for k, v in weights.items() if k.startswith(prefix))
        assert profile.layer_bytes[index] == expected
    assert profile.embedding_bytes == weights["model.embed_tokens.weight"].nbytes
    # Tied: the head stores only the final norm.
    assert profile.head_bytes == weights["model.norm.weight"].nbytes
    assert profile.tied_embeddings


def test_deepseek_moe_flops_count_only_used_experts() -> None:
    profile = profile_from_config(DEEPSEEK_CONFIG, 4)
    dense_layer, moe_layer = profile.layer_flops_per_token[0], profile.layer_flops_per_token[1]
    hidden, expert = DEEPSEEK_CONFIG["hidden_size"], DEEPSEEK_CONFIG["moe_intermediate_size"]
    unused_experts = DEEPSEEK_CONFIG["n_routed_experts"] - DEEPSEEK_CONFIG["num_experts_per_tok"]
    stored_moe_params = profile.layer_bytes[1] // 4
    assert moe_layer == 2.0 * (stored_moe_params - unused_experts * 3 * hidden * expert)
    # first_k_dense_replace=1: layer 0 is dense and its FLOPs are its stored parameters x 2.
    assert dense_layer == 2.0 * (profile.layer_bytes[0] // 4)
    assert profile.layer_bytes[1] > profile.layer_bytes[0]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_bytes_include_scales_and_biases(tmp_path: Path, bits: int) -> None:
    model = write_model(tmp_path / "q", QWEN3_CONFIG, mx.bfloat16, quant_bits=bits)
    profile = profile_model(tmp_path / "q")
    weights = dict(tree_flatten(model.parameters()))
    layer0 = {k: v for k, v in weights.items() if k.startswith("model.layers.0.")}
    assert any(k.endswith(".scales") for k in layer0) and any(k.endswith(".biases") for k in layer0)
    assert profile.layer_bytes[0] == sum(v.nbytes for v in layer0.values())
    unquantized = profile_from_config(QWEN3_CONFIG, 2)
    assert profile.layer_bytes[0] < unquantized.layer_bytes[0]
    # KV and FLOPs do not change with weight quantization; activations stay bf16.
    assert profile.activation_dtype_bytes == 2
    assert profile.kv_bytes_per_token_per_layer == unquantized.kv_bytes_per_token_per_layer
    assert profile.layer_flops_per_token == unquantized.layer_flops_per_token


def test_index_json_and_glob_give_the_same_profile(tmp_path: Path) -> None:
    write_model(tmp_path / "one", QWEN3_CONFIG, files=1)
    write_model(tmp_path / "indexed", QWEN3_CONFIG, files=3, with_index=True)
    write_model(tmp_path / "globbed", QWEN3_CONFIG, files=3, with_index=False)
    single = profile_model(tmp_path / "one")
    assert_same_profile(profile_model(tmp_path / "indexed"), single)
    assert_same_profile(profile_model(tmp_path / "globbed"), single)


def test_any_safetensors_name_is_found_without_an_index(tmp_path: Path) -> None:
    write_model(tmp_path / "m", QWEN3_CONFIG)
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "weights.safetensors")
    assert profile_model(tmp_path / "m").num_layers == QWEN3_CONFIG["num_hidden_layers"]


def test_only_headers_are_read(tmp_path: Path) -> None:
    """Cutting every file right after its header leaves the profile unchanged."""
    write_model(tmp_path / "m", QWEN3_CONFIG, files=2)
    before = profile_model(tmp_path / "m")
    for file in (tmp_path / "m").glob("*.safetensors"):
        data = file.read_bytes()
        (header_length,) = struct.unpack("<Q", data[:8])
        file.write_bytes(data[: 8 + header_length])
    assert_same_profile(profile_model(tmp_path / "m"), before)


def test_header_reader_rejects_garbage(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="too short"):
        read_safetensors_header(short)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(struct.pack("<Q", 100) + b"{}")
    with pytest.raises(ValueError, match="ends inside"):
        read_safetensors_header(cut)


def test_missing_files_and_unknown_architectures_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        profile_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_CONFIG))
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        profile_model(tmp_path)
    with pytest.raises(ValueError, match="unsupported model_type"):
        profile_from_config({**QWEN3_CONFIG, "model_type": "mamba"}, 2)


def test_profile_round_trips_through_a_dict() -> None:
    profile = profile_from_config(DEEPSEEK_CONFIG, 4, name="ds")
    assert ModelProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
