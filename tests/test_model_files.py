"""A shard given a Hugging Face repo id fetches only the weight files that hold its layers."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest

from dnet import model_files
from dnet.modelgen import ModelSpec
from dnet.stage import Stage
from planner.tensors import TensorRole, tensor_role


@pytest.fixture
def fake_hub(make_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """snapshot_download served from a generated model; records what was asked for."""
    source = make_model(ModelSpec(num_layers=8, weight_files=4))
    fetched: list[str] = []

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        assert repo_id == "org/tiny-model"
        target = tmp_path / "hub"
        target.mkdir(exist_ok=True)
        for file in source.iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, target / file.name)
                fetched.append(file.name)
        return str(target)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return source, fetched


def weight_files_holding(model: Path, prefixes: list[str]) -> set[str]:
    weight_map = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    return {f for name, f in weight_map.items() if name.startswith(tuple(prefixes))}


def test_middle_layers_fetch_only_their_files(fake_hub) -> None:
    source, fetched = fake_hub
    path = model_files.resolve_for_layers("org/tiny-model", [3, 4])
    weights = {name for name in fetched if name.endswith(".safetensors")}
    assert weights == weight_files_holding(source, ["model.layers.3.", "model.layers.4."])
    assert len(weights) < 4
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()


def test_first_and_last_shards_also_fetch_embedding_and_head(fake_hub) -> None:
    source, fetched = fake_hub
    model_files.resolve_for_layers("org/tiny-model", [6, 7])
    weights = {name for name in fetched if name.endswith(".safetensors")}
    # Tied embeddings: the last shard needs the embedding matrix as its head.
    assert weights == weight_files_holding(
        source, ["model.layers.6.", "model.layers.7.", "model.norm.", "model.embed_tokens."])


def test_a_name_that_is_neither_a_directory_nor_a_repo_is_a_clean_error() -> None:
    with pytest.raises(model_files.ModelNotFoundError):
        model_files.resolve_for_layers("/no/such/model/dir", [0])


@pytest.mark.parametrize(("name", "role", "layer"), [
    ("model.layers.3.self_attn.q_proj.weight", TensorRole.LAYER, 3),
    ("language_model.model.layers.3.linear_attn.A_log", TensorRole.LAYER, 3),  # mlx-lm Qwen3.5
    ("model.language_model.layers.3.mlp.gate.weight", TensorRole.LAYER, 3),  # Hugging Face's
    ("model.layers.61.eh_proj.weight", TensorRole.UNUSED, None),  # DeepSeek V3's MTP layer
    ("mtp.layers.0.mlp.down_proj.weight", TensorRole.UNUSED, None),  # Qwen3.5's MTP
    ("vision_tower.blocks.0.attn.qkv.weight", TensorRole.UNUSED, None),
    ("model.embed_tokens.weight", TensorRole.FIRST, None),
    ("model.embed_tokens_per_layer.weight", TensorRole.FIRST, None),  # Gemma 3n/4 tables
    ("language_model.model.embed_tokens.scales", TensorRole.FIRST, None),
    ("model.norm.weight", TensorRole.LAST, None),
    ("language_model.lm_head.weight", TensorRole.LAST, None),  # Kimi K2.5
])
def test_tensor_names_of_every_layout(name: str, role: TensorRole, layer: int | None) -> None:
    assert tensor_role(name, 61) == (role, layer)


@pytest.mark.parametrize("arch", ["qwen3_5", "kimi_k25", "qwen3_moe"])
def test_a_shard_fetches_and_loads_only_its_files(arch: str, make_model, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Models whose tensors live under `language_model.` too: the files of layers 3-4 only,
    and a stage loads from them."""
    source = make_model(ModelSpec(arch=arch, dtype="float32", num_layers=8, weight_files=4))
    fetched = serve_as_hub(source, tmp_path, monkeypatch)
    path = model_files.resolve_for_layers("org/tiny-model", [3, 4])
    weights = {name for name in fetched if name.endswith(".safetensors")}
    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    assert weights == {f for n, f in index.items() if tensor_role(n, 8)[1] in (3, 4)}
    assert len(weights) < 4
    stage = Stage(path, [3, 4])
    assert not stage.holds_embedding and not stage.holds_head


def serve_as_hub(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    fetched: list[str] = []

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        target = tmp_path / "hub"
        target.mkdir(exist_ok=True)
        for file in source.iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, target / file.name)
                fetched.append(file.name)
        return str(target)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return fetched
