"""Hidden states to and from the wire: raw buffer bytes, no per-element Python.

Which dtypes travel, and what a well-formed tensor is, is `dnet.ring.frames`' rule
(`WIRE_DTYPE_BYTES`, `check_hidden`); this module only converts MLX arrays.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from dnet.proto import dnet_ring_pb2 as pb
from dnet.ring.frames import WIRE_DTYPE_BYTES

# Each wire dtype's MLX dtype, and the numpy dtype whose items have the same width.
_DTYPES: dict[str, tuple[mx.Dtype, np.dtype]] = {
    "bfloat16": (mx.bfloat16, np.dtype(np.uint16)),
    "float16": (mx.float16, np.dtype(np.float16)),
    "float32": (mx.float32, np.dtype(np.float32)),
}
assert set(_DTYPES) == set(WIRE_DTYPE_BYTES)
_NAMES = {mx_dtype: name for name, (mx_dtype, _) in _DTYPES.items()}


class TensorError(ValueError):
    """An array cannot travel: its dtype is not a wire dtype."""


def encode(array: mx.array) -> pb.Tensor:
    """The wire form of `array` (any shape; bfloat16, float16 or float32), bytes copied once.

    Raises TensorError for any other dtype.
    """
    name = _NAMES.get(array.dtype)
    if name is None:
        raise TensorError(f"cannot send dtype {array.dtype}")
    return pb.Tensor(shape=list(array.shape), dtype=name, data=bytes(memoryview(array)))


def decode(tensor: pb.Tensor) -> mx.array:
    """The array of a tensor that passed `frames.check_hidden`: its shape and dtype."""
    mx_dtype, np_dtype = _DTYPES[tensor.dtype]
    flat = mx.array(np.frombuffer(tensor.data, dtype=np_dtype))
    if mx_dtype == mx.bfloat16:
        flat = flat.view(mx.bfloat16)
    return flat.reshape(tuple(tensor.shape))
