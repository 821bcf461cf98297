"""The QDQ reading of QOperator models on hand-built graphs (no torch: the fast tier): exact,
reversible, and refusing what it does not know by node."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import run
from onnxsnp.errors import SnpError
from onnxsnp.ir.qoperator import qdq_view
from onnxsnp.ir.qoperator_fuse import fused

pytest.importorskip("onnxruntime.quantization")


def _float_model(path) -> None:
    """x → MatMul(W1) + b → Reshape → Transpose → Softmax → MatMul(W2) → y: products, a bias,
    integer-moving ops and a softmax, each of which quantize_static writes as a QLinear op."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((8, 12)).astype(np.float32), "w1"),
               numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "b1"),
               numpy_helper.from_array(np.array([0, 4, 3], np.int64), "shape"),
               numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias"),
             helper.make_node("Reshape", ["hb", "shape"], ["r"], name="reshape"),
             helper.make_node("Transpose", ["r"], ["t"], name="transpose", perm=[0, 2, 1]),
             helper.make_node("Softmax", ["t"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.fixture(scope="module", params=[False, True], ids=["per-tensor", "per-channel"])
def qoperator(request, tmp_path_factory):
    from quantize import quantize_static_qoperator

    folder = tmp_path_factory.mktemp("qop_graphs")
    _float_model(folder / "float.onnx")
    rng = np.random.default_rng(1)
    inputs = [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(4)]
    return onnx.load(str(quantize_static_qoperator(folder / "float.onnx", folder / "qop.onnx", inputs, request.param)))


def test_quantizer_wrote_qlinear_ops(qoperator):
    ops = {n.op_type for n in qoperator.graph.node}
    assert {"QLinearMatMul", "QLinearAdd", "QLinearSoftmax"} <= ops and "MatMul" not in ops


def test_reading_and_fusing_back_are_exact(qoperator):
    view = qdq_view(qoperator)
    assert not {n.op_type for n in view.model.graph.node if n.op_type.startswith("QLinear")}
    assert {"MatMul", "Add", "Softmax", "Reshape", "Transpose"} <= {n.op_type for n in view.model.graph.node}
    back = fused(view, view.model)
    onnx.checker.check_model(back)
    assert sorted(n.op_type for n in back.graph.node) == sorted(n.op_type for n in qoperator.graph.node)
    x = {"x": np.random.default_rng(2).standard_normal((5, 8)).astype(np.float32)}
    want = run(qoperator, x, optimize=False)[0]
    assert np.array_equal(run(back, x, optimize=False)[0], want)
    assert np.abs(run(view.model, x, optimize=False)[0] - want).max() <= 1e-6


def test_float_model_has_no_reading(tmp_path):
    _float_model(tmp_path / "float.onnx")
    assert qdq_view(onnx.load(str(tmp_path / "float.onnx"))) is None


def test_unknown_qlinear_op_is_refused_by_node(qoperator):
    model = onnx.ModelProto()
    model.CopyFrom(qoperator)
    softmax = next(n for n in model.graph.node if n.op_type == "QLinearSoftmax")
    softmax.op_type = "QLinearLeakyRelu"
    with pytest.raises(SnpError, match=f"^QLinearLeakyRelu node {softmax.name}: "):
        qdq_view(model)
