"""Block-quantized weights (com.microsoft.MatMulNBits) on small graphs quantized at test time by
onnxruntime's own MatMulNBits quantizer: 4 and 8 bits, symmetric and with zero points. The float
view computes what the quantized model does; an unchanged weight comes back bit for bit; a cut
one is quantized again with the same bits and block size, and the error that adds is reported."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnp.ir.nbits import float_view

K, N, TOKENS = 64, 48, 5


def quantized_mlp(bits: int, symmetric: bool) -> onnx.ModelProto:
    """x (1, T, K) → MatMul [K, N] → Relu → MatMul [N, K], both weights quantized by onnxruntime."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((N, K)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=16, is_symmetric=symmetric)
    quantizer.process()
    return quantizer.model.model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


FORMS = [(4, True), (4, False), (8, True), (8, False)]


@pytest.mark.parametrize("bits,symmetric", FORMS)
def test_float_view_computes_what_the_quantized_model_does(bits, symmetric):
    model = quantized_mlp(bits, symmetric)
    assert [n.op_type for n in model.graph.node].count("MatMulNBits") == 2
    view = float_view(model)
    assert sorted(view.packed) == sorted(n.name for n in model.graph.node if n.op_type == "MatMulNBits")
    assert {n.op_type for n in view.model.graph.node} == {"MatMul", "Relu"}
    x = np.random.default_rng(1).standard_normal((1, TOKENS, K)).astype(np.float32)
    np.testing.assert_allclose(run(view.model, x), run(model, x), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bits,symmetric", FORMS)
def test_unchanged_weights_come_back_bit_for_bit(bits, symmetric):
    model = quantized_mlp(bits, symmetric)
    view = float_view(model)
    back = view.requantize(view.model)
    assert not view.errors and not view.feedback
    original = {t.name: t.SerializeToString() for t in model.graph.initializer}
    assert {t.name: t.SerializeToString() for t in back.graph.initializer} == original
    assert [helper.printable_node(n) for n in back.graph.node] == [helper.printable_node(n) for n in model.graph.node]


@pytest.mark.parametrize("bits,symmetric", FORMS)
def test_a_cut_weight_is_quantized_again_with_its_scheme(bits, symmetric):
    """Hidden units 0…N/2 of the MLP removed from the float view, as a rewrite would cut them."""
    model = quantized_mlp(bits, symmetric)
    view = float_view(model)
    keep = np.arange(N // 2)
    cut = onnx.ModelProto()
    cut.CopyFrom(view.model)
    weights = {t.name: numpy_helper.to_array(t) for t in cut.graph.initializer}
    nodes = {n.name.split("_Q")[0]: n for n in cut.graph.node}  # the quantizer names them fc1_Q4, fc2_Q8, …
    for node, axis in (("fc1", 1), ("fc2", 0)):
        name = nodes[node].input[1]
        cut.graph.initializer.append(numpy_helper.from_array(np.take(weights[name], keep, axis), f"{name}__snp1"))
        nodes[node].input[1] = f"{name}__snp1"
    requantized = view.requantize(cut)
    matmuls = {n.name.split("_Q")[0]: n for n in requantized.graph.node if n.op_type == "MatMulNBits"}
    attributes = {name: {a.name: helper.get_attribute_value(a) for a in n.attribute} for name, n in matmuls.items()}
    assert (attributes["fc1"]["K"], attributes["fc1"]["N"]) == (K, N // 2)
    assert (attributes["fc2"]["K"], attributes["fc2"]["N"]) == (N // 2, K)
    assert all(a["bits"] == bits and a["block_size"] == 16 for a in attributes.values())
    assert all(len(n.input) == (3 if symmetric else 4) for n in matmuls.values())  # zero points where they were
    bound = 0.1 if bits == 4 else 0.01  # relative weight error of one more rounding
    assert len(view.errors) == 2 and all(0 < e < bound for e in view.errors.values())
    x = np.random.default_rng(1).standard_normal((1, TOKENS, K)).astype(np.float32)
    want, got = run(cut, x), run(requantized, x)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2 * bound


def correlated_inputs(tokens: int, width: int, seed: int = 2) -> np.ndarray:
    """Inputs whose features share a few strong directions (as a transformer's hidden units do):
    rounding errors of different rows then add up in X·W, and error feedback has something to cancel."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((tokens, 4)) @ rng.standard_normal((4, width)) * 3
            + 0.3 * rng.standard_normal((tokens, width)))


@pytest.mark.parametrize("bits,symmetric", FORMS)
def test_error_feedback_without_correlation_is_rounding_to_nearest(bits, symmetric):
    """With H ∝ I no row's error has anywhere to go: GPTQ must give round-to-nearest's levels."""
    from onnxsnp.ir.nbits import _error_feedback, _rounded

    weight = np.random.default_rng(3).standard_normal((40, 24)).astype(np.float32)  # 40: a partial last block
    for got, want in zip(_error_feedback(weight, 5.0 * np.eye(40), bits, 16, not symmetric),
                         _rounded(weight, bits, 16, not symmetric)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bits,symmetric", FORMS)
def test_a_refitted_weight_with_its_gram_keeps_its_outputs_closer(bits, symmetric):
    """fc2's weight replaced by new float values (as a refit writes them): with the Gram of its inputs
    the requantized layer's outputs on those inputs are closer to the float layer's than with
    rounding to nearest, and the reported error is that output error."""
    from onnxsnp.ir.nbits import dequantize

    view = float_view(quantized_mlp(bits, symmetric))
    refit = onnx.ModelProto()
    refit.CopyFrom(view.model)
    fc2 = next(n for n in refit.graph.node if n.name.startswith("fc2"))
    fresh = np.random.default_rng(4).standard_normal((N, K)).astype(np.float32)
    refit.graph.initializer.append(numpy_helper.from_array(fresh, "fresh"))
    fc2.input[1] = "fresh"
    hidden = correlated_inputs(512, N, seed=5)
    gram = hidden.T @ hidden
    errors: dict[str, float] = {}
    for label, grams in (("nearest", None), ("feedback", {fc2.name: gram})):
        requantized = view.requantize(refit, grams)
        node = next(n for n in requantized.graph.node if n.name == fc2.name)
        tensors = {t.name: numpy_helper.to_array(t) for t in requantized.graph.initializer}
        restored = dequantize(tensors[node.input[1]], tensors[node.input[2]],
                              tensors[node.input[3]] if len(node.input) > 3 else None, N, K, bits, 16)
        errors[label] = np.linalg.norm(hidden @ (restored - fresh)) / np.linalg.norm(hidden @ fresh)
        if grams:
            assert view.feedback[fc2.name] == pytest.approx(errors[label], rel=1e-3)
    assert errors["feedback"] < 0.8 * errors["nearest"]
