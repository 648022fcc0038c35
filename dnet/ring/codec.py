"""Hidden states to and from the wire: raw buffer bytes, no per-element Python."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from dnet.proto import dnet_ring_pb2 as pb

# The dtypes activations travel in, and the numpy dtype whose items have the same width.
WIRE_DTYPES: dict[str, tuple[mx.Dtype, np.dtype]] = {
    "bfloat16": (mx.bfloat16, np.dtype(np.uint16)),
    "float16": (mx.float16, np.dtype(np.float16)),
    "float32": (mx.float32, np.dtype(np.float32)),
}
_NAMES = {mx_dtype: name for name, (mx_dtype, _) in WIRE_DTYPES.items()}


class TensorError(ValueError):
    """A tensor on the wire is malformed: unknown dtype, bad shape or wrong byte count."""


def encode(array: mx.array) -> pb.Tensor:
    name = _NAMES.get(array.dtype)
    if name is None:
        raise TensorError(f"cannot send dtype {array.dtype}")
    return pb.Tensor(shape=list(array.shape), dtype=name, data=bytes(memoryview(array)))


def check(tensor: pb.Tensor, hidden_size: int) -> None:
    """Raise TensorError unless the tensor is well-formed hidden states [rows, tokens, hidden].

    No MLX here: it runs on gRPC threads, and MLX arrays belong to the thread that makes them.
    """
    if tensor.dtype not in WIRE_DTYPES:
        raise TensorError(f"unsupported dtype {tensor.dtype!r}; "
                          f"expected one of {list(WIRE_DTYPES)}")
    shape = tuple(tensor.shape)
    if len(shape) != 3 or shape[0] < 1 or shape[1] < 1 or shape[2] != hidden_size:
        raise TensorError(f"hidden states must have shape [rows, tokens, {hidden_size}]; "
                          f"got {list(shape)}")
    np_dtype = WIRE_DTYPES[tensor.dtype][1]
    expected = math.prod(shape) * np_dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorError(f"tensor of shape {list(shape)} needs {expected} bytes; "
                          f"got {len(tensor.data)}")


def decode(tensor: pb.Tensor) -> mx.array:
    """The array of a tensor that passed `check`."""
    mx_dtype, np_dtype = WIRE_DTYPES[tensor.dtype]
    flat = mx.array(np.frombuffer(tensor.data, dtype=np_dtype))
    if mx_dtype == mx.bfloat16:
        flat = flat.view(mx.bfloat16)
    return flat.reshape(tuple(tensor.shape))
