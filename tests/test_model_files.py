"""A shard given a Hugging Face repo id fetches only the weight files that hold its layers."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest

from dnet import model_files
from dnet.modelgen import ModelSpec


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
