"""The structural check of a pruned model (onnxsnp.verify.verification.check_structure): shape
inference runs on a copy whose larger weights are stubs (name, type, dims), and still rejects
what the whole model's inference rejects; the checker still sees every weight's bytes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnp.errors import SnpError
from onnxsnp.verify.verification import check_structure, weight_stubs

TOKENS, WIDTH = 5, 32  # a WIDTH × WIDTH float32 weight: 4 kB, above the stubs' 1 kB threshold


def linear_model(rows: int = WIDTH) -> onnx.ModelProto:
    """x (1, TOKENS, WIDTH) → MatMul (rows × WIDTH weight) → Reshape to (TOKENS, WIDTH)."""
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(rows, WIDTH)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([TOKENS, WIDTH], np.int64), "shape")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [TOKENS, WIDTH])],
                              [weight, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_stubs_keep_names_types_and_dims_and_small_integer_tensors_whole():
    model = linear_model()
    stubs = {t.name: t for t in weight_stubs(model).graph.initializer}
    assert list(stubs["w"].dims) == [WIDTH, WIDTH] and stubs["w"].data_type == TensorProto.FLOAT
    assert stubs["w"].raw_data == b"" and stubs["w"].data_location == TensorProto.EXTERNAL
    assert stubs["shape"] == model.graph.initializer[1]
    assert len(model.graph.initializer[0].raw_data) == 4 * WIDTH * WIDTH  # the input is left as it was
    check_structure(model)


def test_a_weight_of_the_wrong_shape_fails_shape_inference():
    with pytest.raises(SnpError, match="shape inference"):
        check_structure(linear_model(rows=WIDTH - 3))


def test_a_weight_whose_bytes_do_not_fill_its_dims_fails_the_checker():
    model = linear_model()
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    with pytest.raises(SnpError, match="onnx.checker"):
        check_structure(model)


def test_big_models_are_checked_by_path_with_the_same_result(monkeypatch):
    import onnxsnp.verify.verification as verification

    monkeypatch.setattr(verification, "is_big", lambda model: True)
    check_structure(linear_model())
    with pytest.raises(SnpError, match="shape inference"):
        check_structure(linear_model(rows=WIDTH - 3))
