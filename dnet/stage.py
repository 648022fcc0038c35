"""One shard's slice of a model: its layers, built with mlx-lm's own model classes.

The shard holding layer 0 also runs what comes before it (embedding), the one holding the
last layer what comes after (final norm, head); a shard may hold several non-contiguous runs
of layers (a multi-round ring): a frame names the layer to start at and the shard runs the
contiguous run that starts there. How each end and each layer's mask are computed is learned
from the model's own code (dnet/structure.py), so every architecture mlx-lm defines runs by
the same mechanism; only proven types are accepted. Only compute lives here: no networking,
no threads.

Loading builds the full model lazily (no memory), probes it, then hollows out the layers not
held and drops the ends this stage does not run, before any weight is read: the checkpoint's
tensors are then kept exactly when this stage's modules own them, so mlx-lm's strict loader
checks that nothing is missing.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, load_model

from dnet.model_facts import layer_caches
from dnet.model_files import format_layers, read_config
from dnet.progress import progress
from dnet.structure import Cache, ModelStructure, UnsupportedModelError, check_proven
from dnet.weights import LayerWindow
from planner.model_profile import read_safetensors_header

__all__ = ["Cache", "Stage", "UnsupportedModelError", "contiguous_runs"]

log = logging.getLogger(__name__)


def contiguous_runs(layers: list[int]) -> list[tuple[int, int]]:
    """[0,1,2,6,7] -> [(0, 3), (6, 8)]: half-open runs of consecutive layers."""
    runs: list[tuple[int, int]] = []
    for layer in sorted(set(layers)):
        if runs and runs[-1][1] == layer:
            runs[-1] = (runs[-1][0], layer + 1)
        else:
            runs.append((layer, layer + 1))
    return runs


def _holds_arrays(value: Any) -> bool:
    return any(isinstance(leaf, mx.array) for _, leaf in tree_flatten(value))


def _hollow(module: nn.Module, keep: tuple[str, ...] = ()) -> None:
    """Drop every submodule and array of `module` except `keep`; plain attributes stay."""
    for key in list(module.keys()):
        if key not in keep and _holds_arrays(module[key]):
            del module[key]


def _stage_model_classes(layers: set[int], total_layers: int):
    """A get_model_classes for mlx-lm's load_model that builds only this stage's modules."""
    holds_first, holds_last = 0 in layers, total_layers - 1 in layers

    def get_classes(config: dict):
        model_class, args_class = _get_classes(config)

        class StageModel(model_class):
            def __init__(self, args):
                super().__init__(args)
                # Probe the full model first: masks may come from layers this stage lacks.
                object.__setattr__(self, "structure", ModelStructure(self))
                for i, layer in enumerate(self.structure.inner.layers):
                    if i not in layers:
                        _hollow(layer)  # its static attributes stay for the model's code

            def sanitize(self, weights):
                raw = list(weights.items())  # alive, so ids stay unique while mapping
                raw_names = {id(array): name for name, array in raw}
                parent = getattr(super(), "sanitize", None)
                if parent is not None:
                    weights = parent(weights)
                self._prune_ends()
                names = {name for name, _ in tree_flatten(self.parameters())}
                kept = {name: w for name, w in weights.items()
                        if name in names or name.rpartition(".")[0] + ".weight" in names}
                # Which checkpoint tensor each kept array is, when sanitize left it as is:
                # streaming re-reads layers by these names.
                object.__setattr__(self, "raw_names", {
                    name: raw_names.get(id(w)) for name, w in kept.items()})
                return kept

            def _prune_ends(self):
                """Drop what runs before layer 0 and after the last one, where not held."""
                inner = self.structure.inner
                inner_path = next(p for p, m in self.named_modules() if m is inner)
                tied = not [n for n, _ in tree_flatten(self.parameters())
                            if not n.startswith(inner_path + ".")]
                if not holds_last:
                    if "norm" in inner:
                        del inner["norm"]
                    module: nn.Module = self
                    for part in inner_path.split("."):  # the head: beside the path to inner
                        _hollow(module, keep=(part,))
                        module = module[part]
                if not holds_first:  # the embedding (the tail's head, when tied) and the like
                    _hollow(inner, keep=("layers", "norm")
                            + (("embed_tokens",) if holds_last and tied else ()))

        return StageModel, args_class

    return get_classes


class Stage:
    """The layers a shard holds, with the model's first and last steps when they belong here."""

    def __init__(self, model_dir: Path, layers: list[int], *, window: int | None = None) -> None:
        config = read_config(model_dir)
        self.model_dir = Path(model_dir)  # the tail loads the tokenizer from it (grammars)
        self.model_type = check_proven(config)
        total = int(config["num_hidden_layers"])
        bad = [layer for layer in layers if not 0 <= layer < total]
        if not layers or bad:
            raise ValueError(f"layers must be a non-empty subset of 0..{total - 1}; got {bad}")
        self.layers = sorted(set(layers))
        self.num_layers = total
        self.runs = contiguous_runs(self.layers)
        self._run_end = {start: end for run_start, end in self.runs
                         for start in range(run_start, end)}
        self.config = config  # config.json, with a multimodal text_config's settings on top
        self.model, _ = load_model(
            model_dir, lazy=True, strict=True,
            get_model_classes=_stage_model_classes(set(self.layers), total))
        self.structure: ModelStructure = self.model.structure
        self._layer_modules = self.structure.inner.layers
        self.holds_embedding = 0 in self.layers
        self.holds_head = total - 1 in self.layers
        # Width of the hidden states this stage receives and sends.
        self.hidden_size = int(config["hidden_size"])
        self.max_context = int(config.get("max_position_embeddings") or 4096)
        # Keep `window` layers resident and stream the rest (dnet/weights.py), or all of them.
        self.window = min(window or len(self.layers), len(self.layers))
        self._weights: LayerWindow | None = None
        mx.eval([w for name, w in tree_flatten(self.model.parameters())
                 if ".layers." not in f".{name}"])
        if self.window < len(self.layers):
            self._tensor_sources = self._layer_tensor_sources(model_dir)
            self._weights = LayerWindow({i: self._layer_modules[i] for i in self.layers},
                                        self._read_layer, self.window)
            self._weights.warm()
        else:
            # Layer by layer, for the progress bar: reading weights can take minutes.
            for i in progress(self.layers, f"loading {len(self.layers)} layers"):
                mx.eval(self._layer_modules[i].parameters())
        del self.model.raw_names
        self._caches = layer_caches(config, self._dtype())
        log.info("loaded layers %s of %d (%s), %s", format_layers(self.layers), total,
                 self.model_type, f"window {self.window}, streaming the rest from disk"
                 if self._weights else "all resident")

    def _dtype(self) -> mx.Dtype:
        """The dtype activations run in: that of the layers' norms (never quantized)."""
        params = tree_flatten(self._layer_modules[self.layers[0]].parameters())
        floats = [(name, a.dtype) for name, a in params if mx.issubdtype(a.dtype, mx.floating)]
        for name, dtype in floats:
            if name.endswith("norm.weight"):
                return dtype
        if not floats:
            raise UnsupportedModelError("a layer without floating-point weights")
        return floats[0][1]

    def close(self) -> None:
        if self._weights is not None:
            self._weights.close()

    @property
    def streaming(self) -> bool:
        return self._weights is not None

    def kv_bytes(self, tokens: int) -> int:
        """Bytes the caches of this stage's layers hold for one request of `tokens` tokens.

        Full-attention layers grow with the context, sliding-window layers stop at their
        window, linear-attention layers keep a fixed-size state (dnet/model_facts.py).
        """
        return sum(self._caches[i].bytes_for(tokens) for i in self.layers)

    # ----- streaming ---------------------------------------------------------------------

    def _layer_tensor_sources(self, model_dir: Path) -> dict[int, dict[str, tuple[Path, str]]]:
        """For each held layer: parameter name (relative to the layer) -> (file, tensor name)."""
        file_of: dict[str, Path] = {}
        for file in sorted(model_dir.glob("model*.safetensors")):
            file_of.update({name: file for name in read_safetensors_header(file)})
        inner_path = next(p for p, m in self.model.named_modules() if m is self.structure.inner)
        sources: dict[int, dict[str, tuple[Path, str]]] = {}
        for layer in self.layers:
            prefix = f"{inner_path}.layers.{layer}."
            own = {}
            for name, _ in tree_flatten(self._layer_modules[layer].parameters()):
                raw = self.model.raw_names.get(prefix + name)
                if raw is None or raw not in file_of:
                    raise UnsupportedModelError(
                        f"streaming weights needs each layer's tensors stored as mlx-lm runs "
                        f"them; {prefix + name} is rebuilt at load (convert the model with "
                        "mlx_lm.convert first, or hold every layer: no --prefetch-window)")
                own[name] = (file_of[raw], raw)
            sources[layer] = own
        return sources

    def _read_layer(self, layer: int) -> dict[str, mx.array]:
        """Lazy arrays of one layer's weights, named relative to the layer module."""
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name, (file, raw) in self._tensor_sources[layer].items():
            by_file.setdefault(file, []).append((name, raw))
        weights: dict[str, mx.array] = {}
        for file, names in by_file.items():
            stored = mx.load(str(file))
            weights.update({name: stored[raw] for name, raw in names})
        return weights

    # ----- compute -----------------------------------------------------------------------

    def run_end(self, start: int) -> int:
        """The layer after the contiguous run that starts at `start`; KeyError if not held."""
        return self._run_end[start]

    def holds(self, layer: int) -> bool:
        return layer in self._run_end

    def new_caches(self) -> dict[int, Cache]:
        """Fresh caches for the held layers, of the types the model's make_cache gives."""
        caches = {}
        for i in self.layers:
            template = self.structure.template(i)
            if template is not None:
                caches[i] = copy.deepcopy(template)
        return caches

    @property
    def cache_templates(self) -> list[Cache]:
        """The model's cache for each layer (all layers), as its make_cache gives them."""
        return self.structure.templates

    def embed(self, tokens: mx.array) -> mx.array:
        """[B, L] token ids -> [B, L, hidden] input of layer 0, as the model computes it."""
        return self.structure.prologue(tokens)

    def forward(self, h: mx.array, start: int, caches: dict[int, Cache]) -> tuple[mx.array, int]:
        """Run the contiguous run of layers starting at `start`; returns (hidden, next layer).

        h: [B, L, hidden]; each layer gets the mask the model's own code would give it.
        """
        end = self._run_end[start]
        masks: dict[tuple, Any] = {}
        for i in range(start, end):
            if self._weights is not None:
                self._weights.acquire(i)
            call = self.structure.calls[i]
            cache = caches.get(i)
            key = self.structure.mask_key(i)
            if key not in masks:
                masks[key] = self.structure.mask(call, h, cache)
            out = self._layer_modules[i](h, masks[key], cache, **dict.fromkeys(call.extra))
            h = out[0] if call.returns_tuple else out
            if self._weights is not None:
                mx.eval(h)  # the layer's weights may leave only once its output exists
                self._weights.release(i)
            elif i < end - 1:
                # Compute this layer while Python builds the next one's graph: the overlap
                # mlx-lm gets from async_eval across whole steps, within one stage. The last
                # layer is left to the caller, who may need only its caches (a prefill).
                mx.async_eval(h)
        return h, end

    def logits(self, h: mx.array) -> mx.array:
        """[B, L, hidden] -> [B, vocab] logits of the last position, by the model's own head."""
        return self.structure.epilogue(h)[:, -1, :]
