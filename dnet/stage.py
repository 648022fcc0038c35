"""One shard's slice of a model: its layers, built with mlx-lm's own model classes.

The shard holding layer 0 also holds the embedding; the one holding the last layer also holds
the final norm and the head. A shard may hold several non-contiguous runs of layers (a
multi-round ring); a frame names the layer to start at and the shard runs the contiguous run
that starts there. Only compute lives here: no networking, no threads.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import _get_classes, load_model

from dnet.model_files import format_layers, read_config, tensor_names_for, weight_files_for
from dnet.progress import progress
from dnet.weights import LayerWindow
from planner import profile_from_config

log = logging.getLogger(__name__)

# Architectures whose mlx-lm model is embed -> layers(h, mask, cache) -> norm -> head, which is
# what a stage replays piecewise. Others (e.g. Gemma scales its embeddings) would need their
# own stage code, so they are refused rather than silently computed wrong.
SUPPORTED_MODEL_TYPES = frozenset({"qwen3", "qwen2", "llama", "mistral", "deepseek_v2"})

Cache = Any  # an mlx-lm KV cache object (KVCache, RotatingKVCache, ...)


class UnsupportedModelError(ValueError):
    pass


def contiguous_runs(layers: list[int]) -> list[tuple[int, int]]:
    """[0,1,2,6,7] -> [(0, 3), (6, 8)]: half-open runs of consecutive layers."""
    runs: list[tuple[int, int]] = []
    for layer in sorted(set(layers)):
        if runs and runs[-1][1] == layer:
            runs[-1] = (runs[-1][0], layer + 1)
        else:
            runs.append((layer, layer + 1))
    return runs


def _stage_model_classes(layers: set[int], total_layers: int):
    """A get_model_classes for mlx_lm's load_model that builds only this stage's modules."""

    def get_classes(config: dict):
        model_class, args_class = _get_classes(config)
        tied = bool(config.get("tie_word_embeddings", False))
        wanted = tuple(tensor_names_for(layers, total_layers, tied))
        holds_head = total_layers - 1 in layers

        class StageModel(model_class):
            def __init__(self, args):
                super().__init__(args)
                # Cache types depend on the full layer list (e.g. sliding-window layers), so
                # take them before pruning; stored outside the module tree on purpose.
                templates = self.make_cache() if hasattr(self, "make_cache") else None
                object.__setattr__(self, "cache_templates", templates)
                inner = self.model
                inner.layers = [
                    layer if i in layers else None for i, layer in enumerate(inner.layers)
                ]
                if 0 not in layers and not (holds_head and tied):
                    del inner["embed_tokens"]
                if not holds_head:
                    del inner["norm"]
                    if "lm_head" in self:
                        del self["lm_head"]

            def sanitize(self, weights):
                weights = super().sanitize(weights)
                return {name: w for name, w in weights.items() if name.startswith(wanted)}

        return StageModel, args_class

    return get_classes


def _layer_files(model_dir: Path, layers: list[int]) -> dict[int, list[Path]]:
    """The weight files holding each layer, from the index when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if not index.exists():
        files = sorted(model_dir.glob("model*.safetensors"))
        return {layer: files for layer in layers}
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    return {layer: [model_dir / f for f in weight_files_for(weight_map,
                                                            [f"model.layers.{layer}."])]
            for layer in layers}


class Stage:
    """The layers a shard holds, with the embedding and head when they belong here."""

    def __init__(self, model_dir: Path, layers: list[int], *, window: int | None = None) -> None:
        config = read_config(model_dir)
        self.model_dir = Path(model_dir)  # the tail loads the tokenizer from it (grammars)
        model_type = config.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model type {model_type!r} is not supported; dnet runs "
                f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
            )
        total = int(config["num_hidden_layers"])
        bad = [layer for layer in layers if not 0 <= layer < total]
        if not layers or bad:
            raise ValueError(f"layers must be a non-empty subset of 0..{total - 1}; got {bad}")
        self.layers = sorted(set(layers))
        self.num_layers = total
        self.runs = contiguous_runs(self.layers)
        self._run_end = {start: end for run_start, end in self.runs
                         for start in range(run_start, end)}
        self.model, self.config = load_model(
            model_dir,
            lazy=True,
            strict=True,
            get_model_classes=_stage_model_classes(set(self.layers), total),
        )
        self.inner = self.model.model
        # Keep `window` layers resident and stream the rest (dnet/weights.py), or all of them.
        self.window = min(window or len(self.layers), len(self.layers))
        self._weights: LayerWindow | None = None
        if self.window < len(self.layers):
            self._layer_files = _layer_files(model_dir, self.layers)
            mx.eval([w for name, w in tree_flatten(self.model.parameters())
                     if not name.startswith("model.layers.")])
            self._weights = LayerWindow({i: self.inner.layers[i] for i in self.layers},
                                        self._read_layer, self.window)
            self._weights.warm()
        else:
            # Layer by layer, for the progress bar: reading weights can take minutes.
            mx.eval([w for name, w in tree_flatten(self.model.parameters())
                     if not name.startswith("model.layers.")])
            for i in progress(self.layers, f"loading {len(self.layers)} layers"):
                mx.eval(self.inner.layers[i].parameters())
        self.holds_embedding = 0 in self.layers
        self.holds_head = total - 1 in self.layers
        self.hidden_size = int(config["hidden_size"])
        self.max_context = int(config.get("max_position_embeddings") or 4096)
        self.model_type = model_type
        self._sliding_window = getattr(self.inner, "sliding_window", None)
        first = self.inner.layers[self.layers[0]]
        dtype_bytes = first.input_layernorm.weight.dtype.size
        per_layer = profile_from_config(config, dtype_bytes).kv_bytes_per_token_per_layer
        self.kv_bytes_per_token = per_layer * len(self.layers)
        log.info("loaded layers %s of %d (%s), %s", format_layers(self.layers), total,
                 model_type, f"window {self.window}, streaming the rest from disk"
                 if self._weights else "all resident")

    def close(self) -> None:
        if self._weights is not None:
            self._weights.close()

    @property
    def streaming(self) -> bool:
        return self._weights is not None

    def _read_layer(self, layer: int) -> dict[str, mx.array]:
        """Lazy arrays of one layer's weights, named relative to the layer module."""
        prefix = f"model.layers.{layer}."
        weights: dict[str, mx.array] = {}
        for file in self._layer_files[layer]:
            weights.update({name: w for name, w in mx.load(str(file)).items()
                            if name.startswith(prefix)})
        weights = self.model.sanitize(weights)
        return {name[len(prefix):]: w for name, w in weights.items()}

    def run_end(self, start: int) -> int:
        """The layer after the contiguous run that starts at `start`; KeyError if not held."""
        return self._run_end[start]

    def holds(self, layer: int) -> bool:
        return layer in self._run_end

    def new_caches(self) -> dict[int, Cache]:
        templates = self.model.cache_templates
        return {
            i: copy.deepcopy(templates[i]) if templates is not None else KVCache()
            for i in self.layers
        }

    def embed(self, tokens: mx.array) -> mx.array:
        return self.inner.embed_tokens(tokens)

    def forward(self, h: mx.array, start: int, caches: dict[int, Cache]) -> tuple[mx.array, int]:
        """Run the contiguous run of layers starting at `start`; returns (hidden, next layer)."""
        end = self._run_end[start]
        masks: dict[int | None, Any] = {}
        for i in range(start, end):
            if self._weights is not None:
                self._weights.acquire(i)
            layer = self.inner.layers[i]
            window = self._sliding_window if getattr(layer, "use_sliding", False) else None
            if window not in masks:
                masks[window] = create_attention_mask(h, caches[i], window_size=window)
            h = layer(h, masks[window], caches[i])
            if self._weights is not None:
                mx.eval(h)  # the layer's weights may leave only once its output exists
                self._weights.release(i)
            elif i < end - 1:
                # Compute this layer while Python builds the next one's graph: the overlap
                # mlx-lm gets from async_eval across whole steps, within one stage. The last
                # layer is left to the caller, who may need only its KV cache (a prefill).
                mx.async_eval(h)
        return h, end

    def logits(self, h: mx.array) -> mx.array:
        """Final norm and head, then the last position: the same ops as mlx-lm's generate_step."""
        h = self.inner.norm(h)
        if "lm_head" in self.model:
            return self.model.lm_head(h)[:, -1, :]
        return self.inner.embed_tokens.as_linear(h)[:, -1, :]
