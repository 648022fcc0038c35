"""Model profiles against mlx-lm's real models, caches and the published sizes of real models."""

from __future__ import annotations

import json
import resource
import struct
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.switch_layers import SwitchLinear

from dnet.model_facts import profile_from_config, profile_model, skeleton
from dnet.modelgen import SLIDING_WINDOW
from dnet.structure import ModelStructure, UnsupportedModelError
from planner import read_safetensors_header
from planner.model_profile import ModelProfile
from tests.conftest import FLOAT_SPECS, QUANT_SPECS, reference_tokenizer
from tests.planner.model_files import QWEN3_CONFIG, write_model

CONFIGS = Path(__file__).parent / "configs"
SPECS = {**{f"{a}-{s.dtype}": s for a, s in FLOAT_SPECS.items()},
         **{f"{a}-quantized": s for a, s in QUANT_SPECS.items()}}


def assert_same_profile(actual: ModelProfile, expected: ModelProfile) -> None:
    for field in ("num_layers", "layer_bytes", "embedding_bytes", "head_bytes",
                  "tied_embeddings", "layer_caches", "layer_flops_per_token",
                  "head_flops_per_token", "activation_dtype_bytes"):
        assert getattr(actual, field) == getattr(expected, field), field


@pytest.mark.parametrize("name", list(SPECS))
def test_config_alone_gives_the_stored_bytes(name: str, make_model) -> None:
    """The lazy skeleton, cast and quantized as the config says, sizes every tensor exactly."""
    model = make_model(SPECS[name])
    config = json.loads((model / "config.json").read_text())
    assert_same_profile(profile_from_config(config, name=model.name), profile_model(model))


@pytest.mark.parametrize("arch", list(FLOAT_SPECS))
def test_cache_sizes_are_mlx_lm_s_caches(arch: str, make_model) -> None:
    """After a prompt longer than every window, each layer's cache holds what the profile says."""
    from tests.conftest import _loaded

    path = make_model(FLOAT_SPECS[arch])
    model, _ = _loaded(str(path))
    profile = profile_model(path)
    tokens = 3 * SLIDING_WINDOW
    caches = make_prompt_cache(model)
    model(mx.array([list(range(3, 3 + tokens - 5))]), cache=caches)
    for token in range(5):  # decode steps settle sliding windows at their size
        model(mx.array([[token + 3]]), cache=caches)
    kinds = set()
    for layer, cache in enumerate(caches):
        if hasattr(cache, "keys_and_values"):  # keys and values, as many as it holds
            arrays = list(cache.keys_and_values())
        else:  # a linear-attention state
            arrays = [a for a in cache.cache if a is not None]
        measured = sum(a.nbytes for a in arrays)
        expected = profile.layer_caches[layer]
        assert measured == expected.bytes_for(tokens), (layer, type(cache).__name__)
        kinds.add((expected.max_tokens is not None, expected.fixed_bytes > 0))
    if arch in ("gemma3_text", "gemma4_text", "gpt_oss"):
        assert (True, False) in kinds  # sliding windows stop at their size
    if arch in ("qwen3_5", "qwen3_5_moe", "qwen3_next"):
        assert (False, True) in kinds  # linear attention keeps a fixed state


def test_mixture_of_experts_flops_count_only_routed_top_k(make_model) -> None:
    path = make_model(FLOAT_SPECS["qwen3_moe"])
    config = json.loads((path / "config.json").read_text())
    profile = profile_model(path)
    model = skeleton(config)
    experts, top_k = config["num_experts"], config["num_experts_per_tok"]
    for index, layer in enumerate(model.model.layers):
        params = sum(v.size for _, v in tree_flatten(layer.parameters()))
        routed = sum(m.weight.size for _, m in layer.named_modules()
                     if isinstance(m, SwitchLinear))
        assert (routed == 0) == (index in config["mlp_only_layers"])  # dense first layer
        active = params - routed + routed * top_k // experts
        assert profile.layer_flops_per_token[index] == 2.0 * active
    assert profile.layer_bytes[1] > profile.layer_bytes[0]


PUBLISHED = {
    # config: (total parameters, parameters a token runs through: every layer's active ones
    # plus the unembedding), as their publishers state them.
    "deepseek_v3.json": (671e9, 37e9),
    "qwen3_moe.json": (235e9, 22e9),
    "gpt_oss.json": (116.83e9, 5.13e9),
    "qwen3_next.json": (80e9, None),  # "A3B" is rounded too far to check
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_give_their_published_sizes(name: str) -> None:
    config = json.loads((CONFIGS / name).read_text())
    profile = profile_from_config(config)
    total_params, active_params = PUBLISHED[name]
    # bfloat16 storage: 2 bytes a parameter; FLOPs: 2 a parameter.
    stored = (sum(profile.layer_bytes) + profile.embedding_bytes + profile.head_bytes) / 2
    assert stored == pytest.approx(total_params, rel=0.01)
    active = (sum(profile.layer_flops_per_token) + profile.head_flops_per_token) / 2
    if active_params is not None:
        assert active == pytest.approx(active_params, rel=0.03)
    assert active < stored / 10  # the planner's time uses these, not all the experts


def test_published_caches_follow_each_layer_type() -> None:
    gemma = profile_from_config(json.loads((CONFIGS / "gemma3_text.json").read_text()))
    windows = {cache.max_tokens for cache in gemma.layer_caches}
    assert windows == {1024, None}  # five sliding layers to each global one
    assert sum(c.max_tokens is None for c in gemma.layer_caches) == 62 // 6
    # 16 KV heads x 128 x 2 (K and V) x 2 bytes per token, capped at the window.
    assert gemma.layer_caches[0].bytes_for(100_000) == 1024 * 16 * 128 * 2 * 2
    assert gemma.cache_bytes_per_layer(100_000) == 100_000 * 16 * 128 * 2 * 2
    nxt = profile_from_config(json.loads((CONFIGS / "qwen3_next.json").read_text()))
    linear = [c for c in nxt.layer_caches if c.fixed_bytes]
    assert len(linear) == 36 and all(c.bytes_per_token == 0 for c in linear)
    # Recurrent state (32 value heads x 128 x 128, float32) + convolution state (3 x 8192).
    assert linear[0].fixed_bytes == 32 * 128 * 128 * 4 + 3 * 8192 * 2
    ds = profile_from_config(json.loads((CONFIGS / "deepseek_v3.json").read_text()))
    # Multi-head latent attention caches the compressed latent: 512 + 64 values a token.
    assert {c.bytes_per_token for c in ds.layer_caches} == {(512 + 64) * 2}


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.json")))
def test_full_size_models_probe_without_memory(name: str) -> None:
    """The stage's probe and the skeleton never compute: a 671B model costs no memory."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    config = json.loads((CONFIGS / name).read_text())
    structure = ModelStructure(skeleton(config))
    assert len(structure.calls) == config["num_hidden_layers"]
    profile_from_config(config)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 512 * 1024, f"{grown_kib / 1024:.0f} MiB"


def test_tokenizer_and_chat_template_come_from_the_model_files(make_model) -> None:
    path = make_model(FLOAT_SPECS["qwen3_5"])
    tokenizer = reference_tokenizer(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert tokenizer.chat_template == config["chat_template"]


def test_only_headers_are_read(tmp_path: Path) -> None:
    """Cutting every file right after its header leaves the profile unchanged."""
    write_model(tmp_path / "m", QWEN3_CONFIG, files=2)
    before = profile_model(tmp_path / "m")
    for file in (tmp_path / "m").glob("*.safetensors"):
        data = file.read_bytes()
        (header_length,) = struct.unpack("<Q", data[:8])
        file.write_bytes(data[: 8 + header_length])
    assert_same_profile(profile_model(tmp_path / "m"), before)


def test_index_json_and_glob_give_the_same_profile(tmp_path: Path) -> None:
    write_model(tmp_path / "one", QWEN3_CONFIG, files=1)
    write_model(tmp_path / "indexed", QWEN3_CONFIG, files=3, with_index=True)
    write_model(tmp_path / "globbed", QWEN3_CONFIG, files=3, with_index=False)
    single = profile_model(tmp_path / "one")
    assert_same_profile(profile_model(tmp_path / "indexed"), single)
    assert_same_profile(profile_model(tmp_path / "globbed"), single)


def test_header_reader_rejects_garbage(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="too short"):
        read_safetensors_header(short)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(struct.pack("<Q", 100) + b"{}")
    with pytest.raises(ValueError, match="ends inside"):
        read_safetensors_header(cut)


def test_missing_files_and_unproven_architectures_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        profile_model(tmp_path)
    with pytest.raises(UnsupportedModelError, match="dnet runs .*qwen3_moe"):
        profile_from_config({**QWEN3_CONFIG, "model_type": "mamba"})


def test_profile_round_trips_through_a_dict() -> None:
    profile = profile_from_config(json.loads((CONFIGS / "qwen3_next.json").read_text()))
    assert ModelProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
