"""ir.sizes.raw_bytes: the size of a tensor's raw_data from its dims and type, equal to the field's
length for every type onnx packs into raw_data, without reading it."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxsnp.io.loading import weight_bytes
from onnxsnp.ir.sizes import raw_bytes

rng = np.random.default_rng(0)
NUMPY_TYPES = (np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16, np.int32, np.int64, np.bool_)


@pytest.mark.parametrize("dtype", NUMPY_TYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 5, 7)])
def test_raw_bytes_is_the_length_of_raw_data(dtype, shape):
    tensor = numpy_helper.from_array((rng.standard_normal(shape) * 10).astype(dtype), "t")
    assert tensor.HasField("raw_data")
    assert raw_bytes(tensor) == len(tensor.raw_data)


@pytest.mark.parametrize("name", ["BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E5M2", "INT4", "UINT4"])
@pytest.mark.parametrize("count", [1, 6, 7])
def test_raw_bytes_of_types_numpy_lacks_or_packs(name, count):
    data_type = getattr(onnx.TensorProto, name)
    values = rng.integers(0, 7, count).tolist() if "INT" in name else rng.standard_normal(count).tolist()
    tensor = helper.make_tensor("t", data_type, [count], values)
    packed = helper.make_tensor("t", data_type, [count], numpy_helper.to_array(tensor).tobytes()
                                if "INT" not in name else bytes((count + 1) // 2), raw=True)
    assert raw_bytes(packed) == len(packed.raw_data)
    if not tensor.HasField("raw_data"):  # values in a typed field: no raw data
        assert raw_bytes(tensor) == 0


def test_tensors_without_raw_data_have_none_and_strings_are_read():
    assert raw_bytes(helper.make_tensor("f", onnx.TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])) == 0
    text = onnx.TensorProto(name="s", data_type=onnx.TensorProto.STRING, dims=[1], raw_data=b"abcde")
    assert raw_bytes(text) == 5
    model = helper.make_model(helper.make_graph([], "g", [], [], [numpy_helper.from_array(np.ones((4, 3), np.float32), "a"),
                                                               numpy_helper.from_array(np.ones(5, np.int64), "b")]))
    assert weight_bytes(model) == 4 * 3 * 4 + 5 * 8
