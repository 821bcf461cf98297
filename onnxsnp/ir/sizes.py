"""Sizes of ONNX tensors read from their declaration, not their data."""
from __future__ import annotations

import math

import onnx

from .external import is_lazy

# ONNX types narrower than a byte: packed two (four) to a byte in raw_data
_SUB_BYTE_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in
                  (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
                  if hasattr(onnx.TensorProto, name)}


def raw_bytes(tensor: onnx.TensorProto) -> int:
    """The size of `tensor`'s raw_data as its dims and type declare it (0 without raw_data),
    without reading the field: each read of raw_data copies it whole into a new bytes object
    (protobuf's upb backend), and the sizes asked for before each session, check and stub came to
    1-1.5 s of a 270 MB decoder's prune (docs/PRUNE_COST_DECODER.md). A tensor whose bytes do not
    fill its dims is the checker's to reject; types without a fixed width are read."""
    if not tensor.HasField("raw_data"):
        return _lazy_bytes(tensor) if is_lazy(tensor) else 0
    count = math.prod(tensor.dims)
    bits = _SUB_BYTE_BITS.get(tensor.data_type)
    if bits is not None:
        return (count * bits + 7) // 8
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError, TypeError):  # UNDEFINED, types this onnx does not know
        return len(tensor.raw_data)
    return len(tensor.raw_data) if dtype.kind == "O" else count * dtype.itemsize  # STRING: no fixed width


def _lazy_bytes(tensor: onnx.TensorProto) -> int:
    """A lazy stub's size (external.py): what its bytes in the data file come to."""
    length = next((entry.value for entry in tensor.external_data if entry.key == "length"), None)
    if length is not None:
        return int(length)
    bits = _SUB_BYTE_BITS.get(tensor.data_type)
    count = math.prod(tensor.dims)
    return (count * bits + 7) // 8 if bits is not None else \
        count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
