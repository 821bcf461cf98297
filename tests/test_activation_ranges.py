"""The activation ranges a static QDQ model's pairs are calibrated again with
(onnxsnp/data/activation_ranges.py) are measured by min and max reductions inside the ranges
graph, one sample a run; they must be the ranges that fetching every paired activation in one
session and taking numpy's min and max gave, bit for bit, NaN samples and all."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnp.data import activation_ranges, calibration

SAMPLES, TOKENS, WIDTH, HIDDEN, OUT = 6, 3, 4, 64, 32
# samples whose input holds a negative entry: Log makes a NaN in their `logs`, only theirs; and
# a large one, whose log would set the range's top were these samples not passed over whole
NEGATIVE_SAMPLES = (1, 4)
LARGE = 50.0


def qdq_model(opset: int) -> onnx.ModelProto:
    """x → pair → MatMul(int8 W1) → `hidden` → pair → MatMul(int8 W2) → y, and Log(x) → `logs` →
    pair → MatMul(int8 W3) → z: every pair per tensor (uint8, onnxruntime's default), the weights
    per tensor int8 (W2 above calibration's 1 KiB in-memory threshold, so the weight-file route
    carries it)."""
    rng = np.random.default_rng(0)
    initializers, nodes = [], []

    def constant(name: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(value, name))
        return name

    def pair(tensor: str, scale: float, zero: int) -> str:
        s, z = constant(f"{tensor}_scale", np.array(scale, np.float32)), constant(f"{tensor}_zero", np.array(zero, np.uint8))
        nodes.append(helper.make_node("QuantizeLinear", [tensor, s, z], [f"{tensor}_q"], name=f"{tensor}_Q"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{tensor}_q", s, z], [f"{tensor}_dq"], name=f"{tensor}_DQ"))
        return f"{tensor}_dq"

    def weight(name: str, shape: tuple[int, int]) -> str:
        levels = constant(f"{name}_int8", rng.integers(-127, 128, shape).astype(np.int8))
        scale, zero = constant(f"{name}_scale", np.array(0.02, np.float32)), constant(f"{name}_zero", np.array(0, np.int8))
        nodes.append(helper.make_node("DequantizeLinear", [levels, scale, zero], [name], name=f"{name}_DQ"))
        return name

    nodes.append(helper.make_node("MatMul", [pair("x", 0.02, 128), weight("W1", (WIDTH, HIDDEN))], ["hidden"], name="mm1"))
    nodes.append(helper.make_node("MatMul", [pair("hidden", 0.05, 128), weight("W2", (HIDDEN, OUT))], ["y"], name="mm2"))
    nodes.append(helper.make_node("Log", ["x"], ["logs"], name="log"))
    nodes.append(helper.make_node("MatMul", [pair("logs", 0.03, 128), weight("W3", (WIDTH, WIDTH))], ["z"], name="mm3"))
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TOKENS, WIDTH])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", "z")], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def feed() -> dict[str, np.ndarray]:
    x = np.random.default_rng(1).uniform(0.1, 2.0, (SAMPLES, TOKENS, WIDTH)).astype(np.float32)
    for sample in NEGATIVE_SAMPLES:
        x[sample, 1, 1], x[sample, 2, 3] = LARGE, -1.0  # the NaN last: onnxruntime passes over a NaN after the first element
    return {"x": x}


def one_session_ranges(model: onnx.ModelProto, tensors: list[str], inputs: dict[str, np.ndarray]
                       ) -> dict[str, tuple[float, float]]:
    """What the ranges were before the reductions: the unrounded model with every tensor a graph
    output, one session, one sample a run, numpy's min and max of each fetched tensor."""
    unrounded = activation_ranges._unrounded(model, activation_ranges._activation_pairs(model))
    unrounded.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors)
    session = ort.InferenceSession(unrounded.SerializeToString(), providers=["CPUExecutionProvider"])
    low, high = dict.fromkeys(tensors, 0.0), dict.fromkeys(tensors, 0.0)
    for start in range(SAMPLES):
        values = session.run(tensors, {k: v[start:start + 1] for k, v in inputs.items()})
        for name, value in zip(tensors, values):
            if value.size:
                low[name] = min(low[name], float(value.min()))
                high[name] = max(high[name], float(value.max()))
    return {t: (low[t], high[t]) for t in tensors}


@pytest.mark.parametrize("opset", [10, 13])  # below 11 the NaN test is IsNaN, from 11 Equal
@pytest.mark.parametrize("route", ["in memory", "weight file"])
def test_reduced_ranges_are_the_fetched_ones(opset, route, monkeypatch):
    if route == "weight file":  # as a model above 16 MB of weights goes: a light graph, the weights in a file
        monkeypatch.setattr(calibration, "FILE_SESSION_BYTES", 1)
    model = qdq_model(opset)
    inputs = feed()
    tensors = sorted(t for t, _, _ in activation_ranges._activation_pairs(model).values())
    assert tensors == ["hidden", "logs", "x"]
    assert (calibration.weight_file(model) is not None) == (route == "weight file")
    want = one_session_ranges(model, tensors, inputs)
    got = activation_ranges._ranges(model, tensors, inputs, batch=SAMPLES, role="input model")
    assert got == want  # exact: float equality of every end
    # the NaN samples were passed over, not the others: a range from the finite samples alone
    # (numpy's log and onnxruntime's differ in the last bit)
    finite = np.log(np.delete(inputs["x"], NEGATIVE_SAMPLES, axis=0))
    assert want["logs"] == pytest.approx((min(0.0, float(finite.min())), max(0.0, float(finite.max()))), rel=1e-6)
    assert want["logs"][1] < np.log(LARGE) / 2 and want["hidden"][0] < 0 < want["hidden"][1]
    assert [n.name for n in model.graph.node][:2] == ["x_Q", "x_DQ"]  # the input model left as it was
