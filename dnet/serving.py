"""What a node serves, named once: the names a model answers to, and its context length.

MLX-free: the HTTP layer and the CLI read these.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

DEFAULT_MODEL_ALIAS = "default_model"  # the model name in the seed's curl example
FALLBACK_CONTEXT_TOKENS = 4096  # a model whose config gives no max_position_embeddings


def model_aliases(model: str) -> frozenset[str]:
    """The names a request may use for `model`: itself, its last path component (the repo's
    or directory's name), and the seed's default alias."""
    return frozenset({model, PurePosixPath(model.rstrip("/")).name, DEFAULT_MODEL_ALIAS})


def accepts_model(model: str, asked: str | None) -> bool:
    """Whether a request that names `asked` (or no model) may be served by `model`."""
    return not asked or asked in model_aliases(model)


def context_tokens(config: Mapping[str, Any]) -> int:
    """The longest prompt plus answer a model takes, from its config.json."""
    return int(config.get("max_position_embeddings") or FALLBACK_CONTEXT_TOKENS)
