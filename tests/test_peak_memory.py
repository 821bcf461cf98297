"""What keeps a prune's peak memory down without changing its result: the rewrite's initializer
order restored in place (no second copy in the protobuf arena), and the graph's decoded weights
dropped after the rewrite and decoded again, equal, when asked for."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxsnp.ir.graph import ModelGraph
from onnxsnp.rewrite.rewriting import _keep_initializer_order

ORIGINAL = ["w0", "w1", "w2", "w3"]


def _tensor(name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.full((2, 3), len(name) + int(name[-1]), np.float32), name)


def test_initializers_are_put_back_in_the_original_order_new_ones_after_in_theirs():
    source = helper.make_model(helper.make_graph([], "g", [], [], [_tensor(n) for n in ORIGINAL]))
    made = ["w2", "new1", "w0", "w3", "new0", "w1"]
    target = helper.make_model(helper.make_graph([], "g", [], [], [_tensor(n) for n in made]))
    _keep_initializer_order(source, target)
    assert [t.name for t in target.graph.initializer] == ORIGINAL + ["new1", "new0"]
    for tensor in target.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), numpy_helper.to_array(_tensor(tensor.name)))


def test_forgotten_constants_are_decoded_again_the_same():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x], [y],
                              [numpy_helper.from_array(weight, "w")])
    g = ModelGraph(helper.make_model(graph))
    first = g.constant("w")
    g.forget_constants()
    again = g.constant("w")
    assert again is not first  # decoded anew: the first copy was not kept
    np.testing.assert_array_equal(again, weight)
    assert g.constant("x") is None  # still nothing for a run-time tensor


def test_decoding_once_keeps_no_large_initializer_and_every_small_one():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 512])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 512])
    large = np.arange(512 * 512, dtype=np.float32).reshape(512, 512)  # 1 MiB: at the default bound
    small = np.ones(512, np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                              "g", [x], [y], [numpy_helper.from_array(large, "w"), numpy_helper.from_array(small, "b")])
    g = ModelGraph(helper.make_model(graph))
    with g.decoding_once():
        first, again = g.constant("w"), g.constant("w")
        assert first is not again  # not kept: decoded for each ask
        np.testing.assert_array_equal(again, large)
        assert g.constant("b") is g.constant("b")  # small ones are kept
        assert g.constant("m") is None
    assert "w" not in g._constants
    assert g.constant("w") is g.constant("w")  # kept again outside
