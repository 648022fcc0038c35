"""Find a model on disk or on the Hugging Face hub, fetching only the files a shard needs."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from planner.tensors import tensors_for, tied_embeddings

log = logging.getLogger(__name__)

# Everything but the weights: configs, tokenizer, chat templates, custom code.
METADATA_PATTERNS = [
    "*.json",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]


class ModelNotFoundError(ValueError):
    """The model is neither a local directory nor a repository we could fetch."""


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise ModelNotFoundError(f"{model_dir} has no config.json")
    return with_text_settings(json.loads(path.read_text()))


def with_text_settings(config: dict) -> dict:
    """Multimodal checkpoints keep the language model's settings under `text_config`."""
    return {**config.get("text_config", {}), **config}


def num_layers(config: dict) -> int:
    return int(config["num_hidden_layers"])


def weight_files_for(weight_map: dict[str, str], names: Iterable[str]) -> list[str]:
    """The weight files that hold any of the given tensors."""
    return sorted({weight_map[name] for name in names})


def _is_local(model: str) -> bool:
    return Path(model).expanduser().exists()


def resolve_metadata(model: str) -> Path:
    """A directory with the model's config and tokenizer, downloading them if needed."""
    if _is_local(model):
        path = Path(model).expanduser().resolve()
        read_config(path)
        return path
    return _download(model, METADATA_PATTERNS)


def resolve_for_layers(model: str, layers: Iterable[int]) -> Path:
    """A directory holding what a shard with `layers` needs; fetches only those weight files."""
    path = resolve_metadata(model)
    if _is_local(model):
        return path
    config = read_config(path)
    index_path = path / "model.safetensors.index.json"
    if not index_path.exists():
        # A single-file checkpoint: the one file holds every layer.
        return _download(model, METADATA_PATTERNS + ["*.safetensors"])
    weight_map = json.loads(index_path.read_text())["weight_map"]
    tied = tied_embeddings(config, weight_map)
    files = weight_files_for(weight_map, tensors_for(weight_map, layers, num_layers(config),
                                                     tied))
    log.info("fetching %d of %d weight files for layers %s", len(files),
             len(set(weight_map.values())), format_layers(layers))
    return _download(model, METADATA_PATTERNS + files)


def _download(repo_id: str, allow_patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        # snapshot_download shows huggingface-hub's own tqdm progress bars.
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except (HFValidationError, RepositoryNotFoundError) as exc:
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local directory nor a Hugging Face repository: {exc}"
        ) from exc
    except OSError as exc:
        raise ModelNotFoundError(f"could not fetch {repo_id!r} from Hugging Face: {exc}") from exc


def format_layers(layers: Iterable[int]) -> str:
    """[0,1,2,5,6] -> '0-2,5-6', for logs."""
    ordered = sorted(set(layers))
    runs: list[str] = []
    start = prev = None
    for layer in ordered:
        if start is None:
            start = prev = layer
        elif layer == prev + 1:
            prev = layer
        else:
            runs.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = layer
    if start is not None:
        runs.append(f"{start}-{prev}" if start != prev else str(start))
    return ",".join(runs)


