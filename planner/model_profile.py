"""What the planner needs to know about a model, read from `config.json` and safetensors headers.

`profile_model` never reads tensor data: a safetensors file starts with a little-endian u64
header length followed by a JSON header giving each tensor's dtype, shape and byte range, and
that is all it opens. FLOPs and KV-cache sizes come from config arithmetic (`architectures`).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from planner import architectures

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

_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


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
    kv_bytes_per_token_per_layer: int
    tied_embeddings: bool
    activation_dtype_bytes: int

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError("a model needs at least one layer")
        if len(self.layer_bytes) != self.num_layers:
            raise ValueError("layer_bytes must list every layer")
        if len(self.layer_flops_per_token) != self.num_layers:
            raise ValueError("layer_flops_per_token must list every layer")

    @property
    def bytes_per_layer(self) -> int:
        # The largest layer, so a memory promise holds whichever layers a device gets.
        return max(self.layer_bytes)

    @property
    def flops_per_token_per_layer(self) -> float:
        return max(self.layer_flops_per_token)

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes) + self.embedding_bytes + self.head_bytes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layer_bytes"] = list(self.layer_bytes)
        data["layer_flops_per_token"] = list(self.layer_flops_per_token)
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
            kv_bytes_per_token_per_layer=int(data["kv_bytes_per_token_per_layer"]),
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
        kv_bytes_per_token_per_layer=kv_bytes_per_token_per_layer,
        tied_embeddings=tied_embeddings,
        activation_dtype_bytes=2,
    )


def _flops_and_kv(config: Mapping[str, Any]) -> tuple[tuple[float, ...], float, int]:
    flops = tuple(2.0 * layer.active for layer in architectures.layer_params(config))
    return (
        flops,
        architectures.head_flops_per_token(config),
        (architectures.kv_elements_per_token_per_layer(config)),
    )


def profile_from_config(
    config: Mapping[str, Any], dtype_bytes: int, name: str | None = None
) -> ModelProfile:
    """A profile by arithmetic alone, for an unquantized model stored at `dtype_bytes` a value."""
    flops, head_flops, kv_elements = _flops_and_kv(config)
    return ModelProfile(
        name=name or str(config.get("_name_or_path", config.get("model_type", "model"))),
        model_type=architectures.architecture(config),
        num_layers=len(flops),
        layer_bytes=tuple(p.stored * dtype_bytes for p in architectures.layer_params(config)),
        layer_flops_per_token=flops,
        embedding_bytes=architectures.embedding_params(config) * dtype_bytes,
        head_bytes=architectures.head_params(config) * dtype_bytes,
        head_flops_per_token=head_flops,
        kv_bytes_per_token_per_layer=kv_elements * dtype_bytes,
        tied_embeddings=architectures.tied_embeddings(config),
        activation_dtype_bytes=dtype_bytes,
    )


def _activation_dtype_bytes(config: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> int:
    # Quantized weights are packed integers; norms keep the dtype activations run in.
    norm = tensors.get("model.norm.weight")
    if norm is not None and norm.dtype in FLOAT_DTYPES:
        return SAFETENSORS_DTYPE_BYTES[norm.dtype]
    for info in tensors.values():
        if info.dtype in FLOAT_DTYPES:
            return SAFETENSORS_DTYPE_BYTES[info.dtype]
    return TORCH_DTYPE_BYTES.get(str(config.get("torch_dtype", "bfloat16")), 2)


def profile_from_tensors(
    config: Mapping[str, Any], tensors: Mapping[str, TensorInfo], name: str
) -> ModelProfile:
    """A profile whose byte sizes come from safetensors header entries (name -> TensorInfo)."""
    flops, head_flops, kv_elements = _flops_and_kv(config)
    num_layers = len(flops)
    layer_bytes = [0] * num_layers
    embedding_bytes = 0
    head_bytes = 0
    for tensor_name, info in tensors.items():
        match = _LAYER_NAME.match(tensor_name)
        if match:
            index = int(match.group(1))
            if index >= num_layers:
                raise ValueError(f"{tensor_name} is past num_hidden_layers={num_layers}")
            layer_bytes[index] += info.nbytes
        elif tensor_name.startswith(("lm_head.", "model.norm.")):
            head_bytes += info.nbytes
        else:
            # The embedding and any stray non-layer tensor load with the ring's first device.
            embedding_bytes += info.nbytes
    missing = [index for index, size in enumerate(layer_bytes) if size == 0]
    if missing:
        raise ValueError(f"the safetensors headers hold no tensors for layers {missing}")
    tied = not any(tensor_name.startswith("lm_head.") for tensor_name in tensors)
    activation_bytes = _activation_dtype_bytes(config, tensors)
    return ModelProfile(
        name=name,
        model_type=architectures.architecture(config),
        num_layers=num_layers,
        layer_bytes=tuple(layer_bytes),
        layer_flops_per_token=flops,
        embedding_bytes=embedding_bytes,
        head_bytes=head_bytes,
        head_flops_per_token=head_flops,
        kv_bytes_per_token_per_layer=kv_elements * activation_bytes,
        tied_embeddings=tied,
        activation_dtype_bytes=activation_bytes,
    )


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


def profile_model(path: str | Path) -> ModelProfile:
    """Profiles a local model directory from `config.json` and its safetensors headers."""
    model_dir = Path(path)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    config = json.loads(config_path.read_text())
    tensors = merge_headers(read_safetensors_header(file) for file in weight_files(model_dir))
    return profile_from_tensors(config, tensors, name=model_dir.name)
