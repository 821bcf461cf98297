"""Weights left in the input's external data file until someone reads them.

A float model loaded whole holds every weight in its protobuf for the whole prune (SmolLM2-135M:
518 MB), and protobuf's upb arena frees none of it until the whole message goes, while the
stages decode what they need anyway (ModelGraph.constant, the sessions' weight files). Loaded
lazily (io/loading.py), each initializer the input keeps in external data stays a stub, its
location made an absolute path: the marker that it is to be read from that file here, one tensor
at a time (`to_array`, `raw_data`), and made whole (`inline`, `materialize`) wherever a copy
leaves the process's own reading: the pruned model, the tensors a session's graph keeps.
onnx's and onnxruntime's own readers refuse absolute locations, so a stub that reached them
unconverted fails loudly instead of reading something else.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def is_lazy(tensor: onnx.TensorProto) -> bool:
    """Whether `tensor` is a stub whose bytes are still in the input's data file."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return False
    return any(entry.key == "location" and os.path.isabs(entry.value) for entry in tensor.external_data)


def _where(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    info = {entry.key: entry.value for entry in tensor.external_data}
    length = info.get("length")
    return info["location"], int(info.get("offset", 0)), int(length) if length is not None else None


def raw_data(tensor: onnx.TensorProto) -> bytes:
    """`tensor`'s bytes: its raw_data, or read from its data file for a lazy stub."""
    if not is_lazy(tensor):
        return tensor.raw_data
    path, offset, length = _where(tensor)
    with open(path, "rb") as data:
        data.seek(offset)
        raw = data.read() if length is None else data.read(length)
    if length is not None and len(raw) != length:
        raise OSError(f"{path}: {tensor.name} ends past the end of the file")
    return raw


def inline(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """`tensor` itself, or for a lazy stub a whole copy of it (its bytes in raw_data), as onnx's
    loader would have made it."""
    if not is_lazy(tensor):
        return tensor
    whole = onnx.TensorProto()
    whole.CopyFrom(tensor)
    _fill(whole)
    return whole


def _fill(tensor: onnx.TensorProto) -> None:
    raw = raw_data(tensor)
    unset = any(entry.key == _UNSET for entry in tensor.external_data)
    tensor.raw_data = raw
    del raw
    del tensor.external_data[:]
    if unset:
        tensor.ClearField("data_location")
    else:
        tensor.data_location = onnx.TensorProto.DEFAULT  # as onnx's loader leaves it


# types numpy_helper.to_array reads from raw_data as np.frombuffer(raw, dtype).reshape(dims)
PLAIN = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8,
          onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT8,
          onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}


def to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """numpy_helper.to_array, reading a lazy stub's bytes from its file (the stub stays a stub):
    the same array, over one copy of the bytes (a whole TensorProto made first would be three)."""
    if not is_lazy(tensor):
        return numpy_helper.to_array(tensor)
    if tensor.data_type in PLAIN and sys.byteorder == "little":
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.frombuffer(raw_data(tensor), dtype=dtype).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(inline(tensor))


def materialize(model: onnx.ModelProto) -> None:
    """Every lazy initializer of `model` made whole, in place, one at a time."""
    for tensor in model.graph.initializer:
        if is_lazy(tensor):
            _fill(tensor)


def has_lazy(model: onnx.ModelProto) -> bool:
    return any(is_lazy(tensor) for tensor in model.graph.initializer)


# a spilled tensor that had no data_location field (external_data's keys are free-form)
_UNSET = "onnxsnp_no_data_location"
_SPILLABLE = {"name", "data_type", "dims", "raw_data", "data_location"}
SPILL_MIN_BYTES = 2**20  # smaller tensors stay in the protobuf: a file read each is not worth it


class Spill:
    """A temporary data file that a model's larger initializers are moved into as they are made,
    each leaving a lazy stub: the pruned model held without its weights while its sessions are
    built from the file, and made whole (`materialize`) once they are gone."""

    def __init__(self):
        self._folder = tempfile.TemporaryDirectory(prefix="onnxsnp-pruned-")
        self.path = Path(self._folder.name) / "weights.bin"
        self._data = open(self.path, "wb")

    def put(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """`tensor` itself (small, lazy already, or not in raw_data), or a lazy stub of it whose
        bytes are appended to the file."""
        fields = {field.name for field, _ in tensor.ListFields()}
        if is_lazy(tensor) or not fields <= _SPILLABLE or "raw_data" not in fields or \
                raw_bytes_declared(tensor) < SPILL_MIN_BYTES:
            return tensor
        raw = tensor.raw_data
        offset = self._data.tell()
        self._data.write(raw)
        self._data.flush()  # readable at once by whoever decodes the stub
        stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", str(self.path)), ("offset", str(offset)), ("length", str(len(raw)))):
            stub.external_data.add(key=key, value=value)
        if "data_location" not in fields:  # made whole, it is then left unset again: the same bytes
            stub.external_data.add(key=_UNSET, value="1")
        return stub

    def close(self) -> None:
        self._data.close()
        self._folder.cleanup()


def raw_bytes_declared(tensor: onnx.TensorProto) -> int:
    """What `tensor`'s dims and plain type declare (0 for other types: they stay where they are)."""
    if tensor.data_type not in PLAIN:
        return 0
    return math.prod(tensor.dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
