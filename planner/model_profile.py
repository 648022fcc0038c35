"""What the planner needs to know about a model: plain data, and the safetensors headers.

A `ModelProfile` gives each layer's bytes, its FLOPs per token (from the parameters a token
actually multiplies through: a mixture-of-experts layer counts only its routed top-k experts)
and its cache (`LayerCache`: keys and values growing per token, up to a sliding window, or a
fixed-size linear-attention state). The planner itself never loads a model: dnet builds
profiles (dnet/model_facts.py) from mlx-lm's own model classes and from the safetensors
headers read here. Reading a header never reads tensor data: a safetensors file starts with a
little-endian u64 header length followed by a JSON header giving each tensor's dtype, shape
and byte range, and that is all `read_safetensors_header` opens.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from planner.tensors import TensorRole, tensor_role

SAFETENSORS_DTYPE_BYTES: dict[str, int] = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
TORCH_DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
# A malformed file could claim an absurd header length; real headers are far below this.
MAX_HEADER_BYTES = 512 * 1024 * 1024



@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class LayerCache:
    """What one layer's cache holds for one request, in bytes.

    Keys and values add `bytes_per_token` per token, up to `max_tokens` tokens (a sliding
    window) or without limit (None); a linear-attention layer keeps `fixed_bytes` of state
    whatever the length. Sizes are those of mlx-lm's own cache objects (dnet/model_facts.py).
    """

    bytes_per_token: int = 0
    max_tokens: int | None = None
    fixed_bytes: int = 0

    def bytes_for(self, tokens: int) -> int:
        held = tokens if self.max_tokens is None else min(tokens, self.max_tokens)
        return held * self.bytes_per_token + self.fixed_bytes


@dataclass(frozen=True)
class ModelProfile:
    """Sizes and costs of a model's parts. Bytes include quantization scales and biases.

    `head_bytes` is the final norm plus `lm_head`; with tied embeddings the head has no matrix of
    its own and reuses the embedding, which the planner then counts on the tail device too.
    """

    name: str
    model_type: str
    num_layers: int
    layer_bytes: tuple[int, ...]
    layer_flops_per_token: tuple[float, ...]
    embedding_bytes: int
    head_bytes: int
    head_flops_per_token: float
    layer_caches: tuple[LayerCache, ...]
    tied_embeddings: bool
    activation_dtype_bytes: int

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError("a model needs at least one layer")
        if len(self.layer_bytes) != self.num_layers:
            raise ValueError("layer_bytes must list every layer")
        if len(self.layer_flops_per_token) != self.num_layers:
            raise ValueError("layer_flops_per_token must list every layer")
        if len(self.layer_caches) != self.num_layers:
            raise ValueError("layer_caches must list every layer")

    @property
    def bytes_per_layer(self) -> int:
        # The largest layer, so a memory promise holds whichever layers a device gets.
        return max(self.layer_bytes)

    @property
    def flops_per_token_per_layer(self) -> float:
        return max(self.layer_flops_per_token)

    def cache_bytes_per_layer(self, context_tokens: int) -> int:
        """The largest layer cache at `context_tokens`, so a promise holds for any layers."""
        return max(cache.bytes_for(context_tokens) for cache in self.layer_caches)

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes) + self.embedding_bytes + self.head_bytes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layer_bytes"] = list(self.layer_bytes)
        data["layer_flops_per_token"] = list(self.layer_flops_per_token)
        data["layer_caches"] = [asdict(cache) for cache in self.layer_caches]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelProfile:
        return cls(
            name=str(data["name"]),
            model_type=str(data["model_type"]),
            num_layers=int(data["num_layers"]),
            layer_bytes=tuple(int(b) for b in data["layer_bytes"]),
            layer_flops_per_token=tuple(float(f) for f in data["layer_flops_per_token"]),
            embedding_bytes=int(data["embedding_bytes"]),
            head_bytes=int(data["head_bytes"]),
            head_flops_per_token=float(data["head_flops_per_token"]),
            layer_caches=tuple(LayerCache(**cache) for cache in data["layer_caches"]),
            tied_embeddings=bool(data["tied_embeddings"]),
            activation_dtype_bytes=int(data["activation_dtype_bytes"]),
        )


def uniform_profile(
    *,
    name: str,
    num_layers: int,
    bytes_per_layer: int,
    flops_per_token_per_layer: float,
    kv_bytes_per_token_per_layer: int,
    embedding_bytes: int = 0,
    head_bytes: int = 0,
    head_flops_per_token: float = 0.0,
    tied_embeddings: bool = False,
) -> ModelProfile:
    """A synthetic model whose layers are all alike (tests, benchmarks, what-if planning)."""
    return ModelProfile(
        name=name,
        model_type="synthetic",
        num_layers=num_layers,
        layer_bytes=(bytes_per_layer,) * num_layers,
        layer_flops_per_token=(flops_per_token_per_layer,) * num_layers,
        embedding_bytes=embedding_bytes,
        head_bytes=head_bytes,
        head_flops_per_token=head_flops_per_token,
        layer_caches=(LayerCache(bytes_per_token=kv_bytes_per_token_per_layer),) * num_layers,
        tied_embeddings=tied_embeddings,
        activation_dtype_bytes=2,
    )


def activation_dtype_bytes(config: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> int:
    """Bytes per activation value: quantized weights are packed integers, norms keep the dtype."""
    for name, info in tensors.items():
        if name.endswith("norm.weight") and info.dtype in FLOAT_DTYPES:
            return SAFETENSORS_DTYPE_BYTES[info.dtype]
    for info in tensors.values():
        if info.dtype in FLOAT_DTYPES:
            return SAFETENSORS_DTYPE_BYTES[info.dtype]
    return TORCH_DTYPE_BYTES.get(str(config.get("torch_dtype", "bfloat16")), 2)


@dataclass(frozen=True)
class StoredBytes:
    """Bytes of a checkpoint's tensors by where they run: each layer, before and after them."""

    layer_bytes: tuple[int, ...]
    embedding_bytes: int  # what runs before layer 0 (embeddings), on the ring's first device
    head_bytes: int  # final norm and lm_head (no matrix when tied), on the tail
    tied_embeddings: bool  # no lm_head tensor: the head reuses the embedding matrix


def stored_bytes(tensors: Mapping[str, TensorInfo], num_layers: int, tied: bool) -> StoredBytes:
    """Sum the header entries per layer (`planner/tensors.py` names them); skip unused ones.

    `tied` (planner.tensors.tied_embeddings): the head reuses the embedding, and an lm_head
    tensor stored anyway is dropped at load, as mlx-lm does.
    """
    layer_bytes = [0] * num_layers
    embedding_bytes = head_bytes = 0
    for tensor_name, info in tensors.items():
        role, layer = tensor_role(tensor_name, num_layers)
        if role is TensorRole.LAYER and layer is not None:
            layer_bytes[layer] += info.nbytes
        elif role is TensorRole.LAST and not (tied and "lm_head" in tensor_name):
            head_bytes += info.nbytes
        elif role is TensorRole.FIRST:
            embedding_bytes += info.nbytes
    missing = [index for index, size in enumerate(layer_bytes) if size == 0]
    if missing:
        raise ValueError(f"the safetensors headers hold no tensors for layers {missing}")
    return StoredBytes(tuple(layer_bytes), embedding_bytes, head_bytes, tied)


def parse_header(header: Mapping[str, Any]) -> dict[str, TensorInfo]:
    """Tensor entries of a decoded safetensors JSON header (the `__metadata__` entry skipped)."""
    tensors: dict[str, TensorInfo] = {}
    for tensor_name, entry in header.items():
        if tensor_name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        tensors[tensor_name] = TensorInfo(
            dtype=str(entry["dtype"]),
            shape=tuple(int(d) for d in entry["shape"]),
            nbytes=end - start,
        )
    return tensors


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Reads only the header of a safetensors file: 8 length bytes, then that much JSON."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path} is too short to be a safetensors file")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > MAX_HEADER_BYTES:
            raise ValueError(f"{path} claims a {header_length}-byte header; not safetensors")
        raw = handle.read(header_length)
    if len(raw) != header_length:
        raise ValueError(f"{path} ends inside its safetensors header")
    return parse_header(json.loads(raw))


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: the index's files, else a glob."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.exists():
        weight_map: Mapping[str, str] = json.loads(index_path.read_text())["weight_map"]
        return [model_dir / file_name for file_name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("model*.safetensors")) or sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {model_dir}")
    return files


def merge_headers(headers: Iterable[Mapping[str, TensorInfo]]) -> dict[str, TensorInfo]:
    merged: dict[str, TensorInfo] = {}
    for header in headers:
        merged.update(header)
    return merged
