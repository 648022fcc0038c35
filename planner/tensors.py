"""Which part of a model a stored tensor belongs to, from its name alone.

Checkpoints name a text model's tensors differently (`model.layers.3.`,
`language_model.model.layers.3.` in mlx-lm's Qwen3.5 and Kimi layouts,
`model.language_model.layers.3.` in Hugging Face's), and carry tensors a text ring never
runs (vision towers, multi-token-prediction layers). One rule, used both to fetch only the
files a shard needs (dnet/model_files.py) and to size each layer for the planner.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any


class TensorRole(Enum):
    """What a stored tensor belongs to, which decides the shards that need it."""

    LAYER = "layer"  # one decoder layer's weights: needed by the shard holding that layer
    FIRST = "first"  # what runs before layer 0 (embeddings): the shard holding layer 0
    LAST = "last"  # what runs after the last layer (final norm, lm_head): the tail shard
    UNUSED = "unused"  # never runs in a text ring: vision/audio towers, MTP layers


# A decoder layer's tensors, whatever the checkpoint calls its text model:
# `model.layers.3.`, `language_model.model.layers.3.`, `model.language_model.layers.3.`.
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Parts of multimodal or multi-token-prediction checkpoints a text ring never runs.
_UNUSED = re.compile(r"(^|\.)(mtp|vision_tower|vision_model|visual|audio_tower|"
                     r"multi_modal_projector|mm_projector|embed_vision|embed_audio)(\.|$)")
_HEAD = re.compile(r"(^|\.)lm_head\.")
_FINAL_NORM = re.compile(r"(^|\.)norm\.[a-z_]+$")


def tensor_role(name: str, total_layers: int) -> tuple[TensorRole, int | None]:
    """(role, layer index) of a tensor named as in a checkpoint's safetensors files.

    Layers past `total_layers` are multi-token-prediction layers (DeepSeek V3 and GLM-4 keep
    them as `model.layers.61.`); they never run in the ring.
    """
    if _UNUSED.search(name):
        return TensorRole.UNUSED, None
    match = _LAYER.search(name)
    if match:
        layer = int(match.group(1))
        if layer >= total_layers:
            return TensorRole.UNUSED, None
        return TensorRole.LAYER, layer
    if _HEAD.search(name) or _FINAL_NORM.search(name):
        return TensorRole.LAST, None
    return TensorRole.FIRST, None


def tensors_for(names: Iterable[str], layers: Iterable[int], total_layers: int,
                tied_embeddings: bool) -> list[str]:
    """The tensors a shard holding `layers` needs, out of a checkpoint's tensor names.

    With tied embeddings the tail projects with the embedding matrix, so it needs the
    `embed_tokens` tensors too (not other first-layer tensors such as per-layer embeddings).
    """
    held = set(layers)
    first, last = 0 in held, total_layers - 1 in held
    wanted = []
    for name in names:
        role, layer = tensor_role(name, total_layers)
        if (role is TensorRole.LAYER and layer in held
                or role is TensorRole.FIRST and (first or last and tied_embeddings
                                                  and _is_embedding(name))
                or role is TensorRole.LAST and last):
            wanted.append(name)
    return wanted


def _is_embedding(name: str) -> bool:
    return re.search(r"(^|\.)embed_tokens\.", name) is not None


def tied_embeddings(config: Mapping[str, Any], names: Iterable[str]) -> bool:
    """Whether the head reuses the embedding matrix: the config says so, or no lm_head is stored."""
    if config.get("tie_word_embeddings"):
        return True
    return not any(_HEAD.search(name) for name in names)
