"""Conversion between numpy arrays and the `fmserve.v1.Tensor` wire message."""

from __future__ import annotations

import numpy as np

from fmserve.errors import InvalidInput
from fmserve.v1 import common_pb2

# KServe v2 datatype names, little-endian as on the wire.
DTYPES: dict[str, np.dtype] = {
    "INT64": np.dtype("<i8"),
    "INT32": np.dtype("<i4"),
    "FP32": np.dtype("<f4"),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def to_wire(array: np.ndarray) -> common_pb2.Tensor:
    """Pack an INT64, INT32 or FP32 array (any byte order) into a Tensor message."""
    dtype = np.dtype(array.dtype).newbyteorder("<")
    name = _NAMES.get(dtype)
    if name is None:
        raise TypeError(f"no wire type for {array.dtype}")
    data = np.ascontiguousarray(array, dtype=dtype).tobytes()
    return common_pb2.Tensor(dtype=name, shape=array.shape, data=data)


def to_domain(tensor: common_pb2.Tensor, name: str = "tensor") -> np.ndarray:
    """Unpack a Tensor message, checking that its data matches its dtype and shape."""
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidInput(f"{name}: unknown dtype {tensor.dtype!r}; use one of {sorted(DTYPES)}")
    shape = tuple(tensor.shape)
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidInput(
            f"{name}: shape {list(shape)} needs {expected} bytes, got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
