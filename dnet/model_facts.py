"""A model's per-layer facts for the planner, from mlx-lm's own model classes.

The planner needs, for every layer, the bytes it holds, the parameters one token multiplies
through, and what its cache holds. Rather than re-deriving each architecture's arithmetic
(multi-head latent attention, gated delta nets, attention sinks, shared experts, dense first
layers...), dnet builds the model from its config with mlx-lm's own class, *lazily*: MLX
computes nothing until asked, so this skeleton of even a 671B-parameter model costs no memory
and takes milliseconds to build.

- Parameters per layer: the skeleton's arrays. Routed experts are mlx-lm's switch layers
  (`SwitchLinear`, stacked `num_experts` deep); a token runs through `k` of them
  (`num_experts_per_tok`, Gemma 4's `top_k_experts`), so a layer's active parameters are its
  other parameters (attention, router, shared experts, dense MLPs) plus k / num_experts of the
  routed ones. FLOPs per token are 2 x active parameters (one multiply-add per weight).
- Caches: `make_prompt_cache(skeleton)` and one lazy decode step give each layer's real cache
  objects with their real shapes and dtypes: keys and values per token (up to the window of a
  `RotatingKVCache`), or a fixed linear-attention state (`ArraysCache`).
- Bytes: the safetensors headers when the weights are at hand (exactly what is stored), else
  the skeleton cast to the config's dtype and quantized as its `quantization` says.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.utils import _get_classes

from dnet.model_files import read_config, with_text_settings
from dnet.structure import ModelStructure, UnsupportedModelError, check_proven
from planner.model_profile import (
    TORCH_DTYPE_BYTES,
    LayerCache,
    ModelProfile,
    TensorInfo,
    activation_dtype_bytes,
    merge_headers,
    read_safetensors_header,
    stored_bytes,
    weight_files,
)
from planner.tensors import tied_embeddings

_DTYPES = {2: mx.bfloat16, 4: mx.float32}  # activation bytes -> the dtype sized with
_TOP_K_KEYS = ("num_experts_per_tok", "top_k_experts", "moe_topk")


def skeleton(config: Mapping[str, Any]) -> nn.Module:
    """The model mlx-lm builds for `config`, with lazy (never computed) random parameters."""
    config = with_text_settings(dict(config))
    check_proven(config)
    model_class, args_class = _get_classes(config)
    try:
        return model_class(args_class.from_dict(config))
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"config.json does not describe a {config.get('model_type')} model "
                         f"mlx-lm can build: {exc}") from exc


def _layers_and_inner(model: nn.Module) -> tuple[list[nn.Module], str]:
    inner = model.model
    path = next(p for p, m in model.named_modules() if m is inner)
    return inner.layers, path


def _top_k(config: Mapping[str, Any]) -> int:
    for key in _TOP_K_KEYS:
        if config.get(key):
            return int(config[key])
    raise UnsupportedModelError(f"a mixture-of-experts config needs one of {_TOP_K_KEYS}")


def active_params(layer: nn.Module, config: Mapping[str, Any]) -> tuple[int, int]:
    """(stored, active) parameters of one unquantized layer: routed experts count k/E."""
    stored = sum(v.size for _, v in tree_flatten(layer.parameters()))
    routed = 0.0
    for _, module in layer.named_modules():
        if isinstance(module, SwitchLinear | QuantizedSwitchLinear):
            size = sum(v.size for _, v in tree_flatten(module.parameters()))
            routed += size * (1.0 - _top_k(config) / module.num_experts)
    return stored, round(stored - routed)


def layer_caches(config: Mapping[str, Any], dtype: mx.Dtype) -> list[LayerCache]:
    """Each layer's cache as mlx-lm makes it, after one lazy decode step in `dtype`."""
    model = skeleton(config)
    model.set_dtype(dtype)
    caches = make_prompt_cache(model)
    model(mx.zeros((1, 1), dtype=mx.uint32), cache=caches)
    layers, _ = _layers_and_inner(model)
    return [_cache_size(caches[i]) if i < len(caches) else LayerCache()
            for i in range(len(layers))]


def _cache_size(cache: Any) -> LayerCache:
    if getattr(cache, "keys", None) is not None and hasattr(cache, "values"):
        keys, values = cache.keys, cache.values
        per_token = (keys.nbytes + values.nbytes) // keys.shape[2]
        return LayerCache(bytes_per_token=per_token, max_tokens=getattr(cache, "max_size", None))
    if isinstance(getattr(cache, "cache", None), list):  # ArraysCache: a fixed-size state
        return LayerCache(fixed_bytes=sum(a.nbytes for a in cache.cache if a is not None))
    raise UnsupportedModelError(f"cannot size a {type(cache).__name__}")


def _split_bytes(model: nn.Module, tied: bool) -> tuple[list[int], int, int]:
    """(bytes per layer, bytes before the layers, bytes after them) of a model's arrays.

    With `tied` embeddings an lm_head the class builds anyway is dropped at load, as mlx-lm
    does, so it is not counted.
    """
    layers, inner_path = _layers_and_inner(model)
    per_layer = [sum(v.nbytes for _, v in tree_flatten(layer.parameters())) for layer in layers]
    first = last = 0
    for name, array in tree_flatten(model.parameters()):
        if name.startswith(f"{inner_path}.layers."):
            continue
        if name.startswith(f"{inner_path}.norm."):
            last += array.nbytes
        elif not name.startswith(f"{inner_path}."):
            last += 0 if tied else array.nbytes
        else:
            first += array.nbytes
    return per_layer, first, last


def _head_params(model: nn.Module) -> int:
    """Parameters outside the text model: the lm_head (none when tied to the embedding)."""
    _, inner_path = _layers_and_inner(model)
    return sum(v.size for n, v in tree_flatten(model.parameters())
               if not n.startswith(inner_path + "."))


def _quantize(model: nn.Module, quantization: Mapping[str, Any]) -> None:
    """Quantize a skeleton as mlx-lm's convert does for this config's `quantization`."""
    group_size, model_predicate = int(quantization["group_size"]), getattr(
        model, "quant_predicate", None)

    def predicate(path: str, module: nn.Module):
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        return model_predicate(path, module) if model_predicate is not None else True

    nn.quantize(model, group_size=group_size, bits=int(quantization["bits"]),
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def _profile(config: Mapping[str, Any], name: str, dtype_bytes: int,
             sizes: tuple[list[int], int, int, bool]) -> ModelProfile:
    model = skeleton(config)
    ModelStructure(model)  # refuses now, not at load, what a stage could not replay
    layers, _ = _layers_and_inner(model)
    params = [active_params(layer, config) for layer in layers]
    head = _head_params(model) or model.model.embed_tokens.weight.size  # tied: the embedding
    # (A tied model's class may build an lm_head anyway; its FLOPs are the same matmul.)
    layer_bytes, first, last, tied = sizes
    return ModelProfile(
        name=name,
        model_type=str(config.get("model_type")),
        num_layers=len(layers),
        layer_bytes=tuple(layer_bytes),
        layer_flops_per_token=tuple(2.0 * active for _, active in params),
        embedding_bytes=first,
        head_bytes=last,
        head_flops_per_token=2.0 * head,
        layer_caches=tuple(layer_caches(config, _DTYPES.get(dtype_bytes, mx.bfloat16))),
        tied_embeddings=tied,
        activation_dtype_bytes=dtype_bytes,
    )


def profile_from_config(config: Mapping[str, Any], name: str | None = None) -> ModelProfile:
    """A profile from `config.json` alone (no weights): the skeleton's bytes in its dtype."""
    config = with_text_settings(dict(config))
    dtype_bytes = TORCH_DTYPE_BYTES.get(str(config.get("torch_dtype", "bfloat16")), 2)
    model = skeleton(config)
    model.set_dtype(_DTYPES[dtype_bytes])
    if config.get("quantization"):
        _quantize(model, config["quantization"])
    tied = bool(config.get("tie_word_embeddings")) or _head_params(model) == 0
    per_layer, first, last = _split_bytes(model, tied)
    return _profile(config, name or str(config.get("_name_or_path", config["model_type"])),
                    dtype_bytes, (per_layer, first, last, tied))


def profile_from_tensors(config: Mapping[str, Any], tensors: Mapping[str, TensorInfo],
                         name: str) -> ModelProfile:
    """A profile whose bytes come from safetensors header entries (name -> TensorInfo)."""
    config = with_text_settings(dict(config))
    num_layers = int(config["num_hidden_layers"])
    stored = stored_bytes(tensors, num_layers, tied_embeddings(config, tensors))
    return _profile(config, name, activation_dtype_bytes(config, tensors),
                    (list(stored.layer_bytes), stored.embedding_bytes, stored.head_bytes,
                     stored.tied_embeddings))


def profile_model(path: str | Path) -> ModelProfile:
    """Profiles a local model directory: its config, and its safetensors headers if any."""
    model_dir = Path(path)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    config = read_config(model_dir)
    try:
        files = weight_files(model_dir)
    except FileNotFoundError:
        return profile_from_config(config, name=model_dir.name)
    tensors = merge_headers(read_safetensors_header(file) for file in files)
    return profile_from_tensors(config, tensors, name=model_dir.name)
