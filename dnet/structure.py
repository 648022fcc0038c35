"""How an mlx-lm model runs, learned from the model's own code: what a ring stage replays.

A stage runs a slice of a model's layers, so it must reproduce, for its slice, exactly what
the model's `__call__` does around them: what happens before the first layer (embedding, and
e.g. Gemma's scaling by sqrt(hidden)), the mask each layer gets (causal, sliding window,
linear-attention padding masks; as a string or an array), how each layer is called, and what
happens after the last layer (final norm, head, e.g. Gemma 4's logit soft-capping). These
differ per architecture, and re-deriving them per family in dnet is how a ring silently goes
wrong. So dnet asks the model instead, by mechanism:

- **Masks and layer calls: a probe.** At load time, before any layer is pruned, the model's
  own `__call__` runs once, lazily (nothing is evaluated, so even a 671B-parameter model costs
  no memory), on *recording caches* and with every layer wrapped. A recording cache answers
  `make_mask` with a token naming itself and the arguments asked for (`window_size`,
  `return_array`; none for linear-attention masks); each wrapped layer notes the token, the
  cache and any extra inputs it was given, then runs the real layer so the model's loop sees
  real outputs. The stage later replays, for layer i, the same mask function with the same
  arguments on layer i's own cache, which has the same type and state as the one the model
  consulted (checked here; all layers see every token, so their offsets agree). This covers
  each family's own rules (DeepSeek V3's array masks, Gemma's and gpt-oss's window pattern,
  Qwen3.5's linear/full split) without a line of per-family code, and a model whose layers
  need what a stage cannot replay (inputs computed by other layers, masks not made from a
  cache) is refused at load, not computed wrong.
- **Before the first layer: the model's own prologue.** The text model's `__call__` runs with
  the first layer replaced by a stop that returns its input: embedding, scaling and whatever
  else the family does come from its own code.
- **After the last layer: the model's own head.** The final norm is the text model's `norm`;
  then the outer model's `__call__` runs with the text model replaced by a stand-in returning
  the normed hidden state, so the head (tied or not) and any soft-capping are the model's own.

The alternative, mlx-lm's `PipelineMixin`, recomputes mask indices for one contiguous slice
per rank inside each model; a ring stage holds several non-contiguous runs and needs the
per-layer answer, which the probe gives for every model whether it has the mixin or not.

Which model types are proven (token for token against mlx-lm, in tests/test_arch_matrix.py)
is listed here, once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, create_ssm_mask
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import MODEL_REMAPPING

# Model types, as `config.json` names them, whose rings are tested to give mlx-lm's tokens.
# mlx-lm runs some types with another type's code (MODEL_REMAPPING: mistral as llama, kimi_k2
# as deepseek_v3, minimax_m2 as minimax); those run the proven code and are accepted too.
PROVEN_MODEL_TYPES = frozenset({
    "qwen3", "qwen2", "llama", "mistral", "deepseek_v2",
    "qwen3_moe", "deepseek_v3", "kimi_k25", "gpt_oss", "glm4_moe", "qwen3_5", "qwen3_5_moe",
    "qwen3_next", "gemma3_text", "gemma4_text", "mixtral", "minimax",
})

Cache = Any  # an mlx-lm cache object: KVCache, RotatingKVCache, ArraysCache, a batch cache


class UnsupportedModelError(ValueError):
    """The model type is not proven to run on a ring, or its structure cannot be replayed."""


def check_proven(config: dict) -> str:
    """The config's model type if a ring runs it; UnsupportedModelError otherwise."""
    model_type = str(config.get("model_type", ""))
    if model_type in PROVEN_MODEL_TYPES or MODEL_REMAPPING.get(model_type) in PROVEN_MODEL_TYPES:
        return model_type
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported: dnet runs "
        f"{', '.join(sorted(PROVEN_MODEL_TYPES))} (each tested token for token against mlx-lm)")


@dataclass(frozen=True)
class MaskRecipe:
    """The mask function a model applies for a layer, and the layer whose cache it consults.

    `kwargs` is None for a linear-attention mask (`create_ssm_mask`), else the keyword
    arguments the model gave `create_attention_mask` (`window_size`, `return_array`).
    """

    source: int
    kwargs: tuple[tuple[str, Any], ...] | None


@dataclass(frozen=True)
class LayerCall:
    """How the model calls one layer: its mask, extra keyword inputs, and its output."""

    mask: MaskRecipe | None
    extra: tuple[str, ...]  # keyword inputs the model passes, all None (their defaults)
    returns_tuple: bool  # the layer returns (hidden, ...) rather than the hidden state


class _MaskToken:
    def __init__(self, source: int, kwargs: dict | None) -> None:
        self.recipe = MaskRecipe(source, None if kwargs is None else tuple(sorted(kwargs.items())))


class _RecordingCache:
    """Stands in for a layer's cache: answers make_mask with a token naming itself."""

    def __init__(self, index: int) -> None:
        self.index = index

    def make_mask(self, n: int, **kwargs) -> _MaskToken:
        return _MaskToken(self.index, kwargs or None)


class _Reached(Exception):  # noqa: N818 - control flow, not an error
    def __init__(self, hidden: mx.array) -> None:
        super().__init__("first layer reached")
        self.hidden = hidden


class _Stop:
    """The first layer during a prologue run: raises with its input."""

    def __init__(self, layer: nn.Module) -> None:
        self._layer = layer

    def __getattr__(self, name: str):
        return getattr(self._layer, name)

    def __call__(self, x, *args, **kwargs):
        raise _Reached(x)


class _Recorder:
    """A layer during the probe: notes how the model calls it, then runs it (lazily)."""

    def __init__(self, layer: nn.Module, index: int, template: Cache | None,
                 log: dict[int, tuple]) -> None:
        self._layer, self._index, self._template, self._log = layer, index, template, log

    def __getattr__(self, name: str):
        return getattr(self._layer, name)

    def __call__(self, x, mask=None, cache=None, **extra):
        if self._index in self._log:
            raise UnsupportedModelError(f"the model calls layer {self._index} twice")
        real_cache = copy.deepcopy(self._template) if self._template is not None else None
        out = self._layer(x, None, real_cache, **extra)
        self._log[self._index] = (mask, cache, extra, isinstance(out, tuple))
        return out


class _HiddenModel(nn.Module):
    """Stands in for the text model while the outer model's head runs: returns `hidden`."""

    def __init__(self, inner: nn.Module, hidden: mx.array) -> None:
        super().__init__()
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_hidden", hidden)

    def __call__(self, *args, **kwargs) -> mx.array:
        return self._hidden

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, "_inner"), name)


def _signature(cache: Cache | None) -> tuple:
    """What decides a cache's masks: its type and, for sliding windows, their geometry."""
    if cache is None:
        return (None,)
    return (type(cache).__name__, getattr(cache, "max_size", None), getattr(cache, "keep", None))


class ModelStructure:
    """The per-layer calls of a full (not yet pruned) mlx-lm model, and its two ends."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.inner = model.model
        self._parent, self._attr = self._inner_slot(model, self.inner)
        layers = self.inner.layers
        if not isinstance(layers, list) or not layers:
            raise UnsupportedModelError("the model's text model has no list of layers")
        if "norm" not in self.inner:
            raise UnsupportedModelError("the model's text model has no final norm")
        self.templates: list[Cache] = make_prompt_cache(model)
        self.calls = self._probe(layers)

    @staticmethod
    def _inner_slot(model: nn.Module, inner: nn.Module) -> tuple[nn.Module, str]:
        for path, module in model.named_modules():
            if module is inner and path:
                parent_path, _, attr = path.rpartition(".")
                parent = model if not parent_path else dict(model.named_modules())[parent_path]
                return parent, attr
        raise UnsupportedModelError("cannot find the text model inside the model")

    def template(self, layer: int) -> Cache | None:
        return self.templates[layer] if layer < len(self.templates) else None

    def _probe(self, layers: list[nn.Module]) -> list[LayerCall]:
        log: dict[int, tuple] = {}
        recorders = [_Recorder(layer, i, self.template(i), log) for i, layer in enumerate(layers)]
        probes = [_RecordingCache(i) for i in range(len(self.templates))]
        self.inner.layers = recorders
        try:
            self.inner(mx.zeros((1, 2), dtype=mx.uint32), cache=probes)
        finally:
            self.inner.layers = layers
        if sorted(log) != list(range(len(layers))):
            raise UnsupportedModelError(f"the model called layers {sorted(log)}, not each once")
        return [self._call_of(i, log[i], probes) for i in range(len(layers))]

    def _call_of(self, index: int, seen: tuple, probes: list) -> LayerCall:
        mask, cache, extra, returns_tuple = seen
        own = probes[index] if index < len(probes) else None
        if cache is not own:
            raise UnsupportedModelError(f"the model gives layer {index} another layer's cache")
        if any(value is not None for value in extra.values()):
            raise UnsupportedModelError(
                f"layer {index} takes inputs computed by other layers "
                f"({', '.join(k for k, v in extra.items() if v is not None)}); a stage "
                "cannot replay them")
        recipe = None
        if isinstance(mask, _MaskToken):
            recipe = mask.recipe
            if recipe.kwargs is not None and {k for k, _ in recipe.kwargs} - {
                    "window_size", "return_array"}:
                raise UnsupportedModelError(f"layer {index}'s mask uses unknown arguments")
            if _signature(self.template(recipe.source)) != _signature(self.template(index)):
                raise UnsupportedModelError(
                    f"layer {index}'s mask comes from layer {recipe.source}'s cache, which is "
                    "of another kind")
        elif mask is not None:
            raise UnsupportedModelError(f"layer {index}'s mask is not made from a cache")
        return LayerCall(recipe, tuple(sorted(extra)), returns_tuple)

    # ----- running the two ends with the model's own code ----------------------------------

    def prologue(self, tokens: mx.array) -> mx.array:
        """[B, L] uint32 token ids -> [B, L, hidden] input of layer 0, by the model's code."""
        layers = self.inner.layers
        self.inner.layers = [_Stop(layers[0])] + layers[1:]
        try:
            self.inner(tokens, cache=[_RecordingCache(i) for i in range(len(self.templates))])
        except _Reached as reached:
            return reached.hidden
        finally:
            self.inner.layers = layers
        raise UnsupportedModelError("the model never reached its first layer")

    def epilogue(self, hidden: mx.array) -> mx.array:
        """[B, L, hidden] output of the last layer -> [B, L, vocab] logits, by the model's code."""
        normed = self.inner.norm(hidden)
        self._parent[self._attr] = _HiddenModel(self.inner, normed)
        try:
            return self.model(mx.zeros(hidden.shape[:2], dtype=mx.uint32))
        finally:
            self._parent[self._attr] = self.inner

    def mask(self, call: LayerCall, hidden: mx.array, cache: Cache) -> Any:
        """The mask the model would give this layer, from the layer's own cache."""
        if call.mask is None:
            return None
        if call.mask.kwargs is None:
            return create_ssm_mask(hidden, cache)
        return create_attention_mask(hidden, cache, **dict(call.mask.kwargs))

    def mask_key(self, index: int) -> tuple:
        """Layers with equal keys get equal masks in one forward pass."""
        call = self.calls[index]
        if call.mask is None:
            return (None,)
        return (call.mask.kwargs, _signature(self.template(index)))
