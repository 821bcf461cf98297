"""The activation ranges a static QDQ model's pairs are calibrated again with
(onnxsnp/data/activation_ranges.py) are measured by min and max reductions inside the ranges
graph, one sample a run; they must be the ranges that fetching every paired activation in one
session and taking numpy's min and max gave, bit for bit, NaN samples and all, in every type a
pair's input can have where onnxruntime's CPU runs the pair.

A QuantizeLinear's input is float, float16, bfloat16 or int32 (every opset). onnxruntime 1.32's
CPU runs a pair on float, and on float16 from opset 19 (or com.microsoft's QuantizeLinear at any
opset); it has no QuantizeLinear kernel for bfloat16 or int32, so such an input model is refused
when it is first run ("onnxruntime cannot run the input model"), before any range is measured —
as it was when the ranges were fetched. (bfloat16 could not have been fetched either: onnxruntime's
Python binding has no numpy type for it; and its CPU has no bfloat16 ReduceMin, ReduceMax or
Equal.) `test_pairs_the_cpu_cannot_run_are_refused_first` holds that: should onnxruntime run such
a pair one day, it fails, and the ranges graph needs a route for that type."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsnp.data import activation_ranges, calibration
from onnxsnp.errors import SnpError

SAMPLES, TOKENS, WIDTH, HIDDEN, OUT = 6, 3, 4, 64, 32
# samples whose input holds a negative entry: Log makes a NaN in their `logs`, only theirs; and
# a large one, whose log would set the range's top were these samples not passed over whole
NEGATIVE_SAMPLES = (1, 4)
LARGE = 50.0


# the types a pair is tested in: (ONNX type, numpy type, the QuantizeLinear's domain, the least opset)
PAIR_TYPES = {"float": (TensorProto.FLOAT, np.float32, "", 10),
              "float16": (TensorProto.FLOAT16, np.float16, "", 19),  # the ONNX QuantizeLinear's from opset 19
              "float16, com.microsoft": (TensorProto.FLOAT16, np.float16, "com.microsoft", 10)}


def qdq_model(opset: int, pair_type: str = "float") -> onnx.ModelProto:
    """x → pair → MatMul(int8 W1) → `hidden` → pair → MatMul(int8 W2) → y, and Log(x) → `logs` →
    pair → MatMul(int8 W3) → z: every pair per tensor (uint8, onnxruntime's default), the weights
    per tensor int8 (W2 above calibration's 1 KiB in-memory threshold, so the weight-file route
    carries it). A pair in another type than float rounds a Cast of its tensor to that type
    (`{tensor}_{type}`, the tensor measured), its scale in that type, and is cast back to float."""
    rng = np.random.default_rng(0)
    initializers, nodes = [], []
    elem, dtype, domain, _ = PAIR_TYPES[pair_type]

    def constant(name: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(value, name))
        return name

    def pair(tensor: str, scale: float, zero: int) -> str:
        s, z = constant(f"{tensor}_scale", np.array(scale, dtype)), constant(f"{tensor}_zero", np.array(zero, np.uint8))
        source, rounded = tensor, f"{tensor}_dq"
        if elem != TensorProto.FLOAT:
            source, rounded = f"{tensor}_{np.dtype(dtype).name}", f"{tensor}_dq_{np.dtype(dtype).name}"
            nodes.append(helper.make_node("Cast", [tensor], [source], name=f"{tensor}_to", to=elem))
        nodes.append(helper.make_node("QuantizeLinear", [source, s, z], [f"{tensor}_q"], name=f"{tensor}_Q", domain=domain))
        nodes.append(helper.make_node("DequantizeLinear", [f"{tensor}_q", s, z], [rounded], name=f"{tensor}_DQ",
                                      domain=domain))
        if rounded != f"{tensor}_dq":
            nodes.append(helper.make_node("Cast", [rounded], [f"{tensor}_dq"], name=f"{tensor}_back", to=TensorProto.FLOAT))
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
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


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


@pytest.mark.parametrize("pair_type, opset", [("float", 10), ("float", 13),  # below 11 the NaN test is IsNaN, from 11 Equal
                                             ("float16", 19), ("float16, com.microsoft", 10),
                                             ("float16, com.microsoft", 13)])
@pytest.mark.parametrize("route", ["in memory", "weight file"])
def test_reduced_ranges_are_the_fetched_ones(pair_type, opset, route, monkeypatch):
    if route == "weight file":  # as a model above 16 MB of weights goes: a light graph, the weights in a file
        monkeypatch.setattr(calibration, "FILE_SESSION_BYTES", 1)
    model = qdq_model(opset, pair_type)
    calibration.Runner(model)  # onnxruntime's CPU runs the input model's pairs in this type
    inputs = feed()
    tensors = sorted(t for t, _, _ in activation_ranges._activation_pairs(model).values())
    dtype = PAIR_TYPES[pair_type][1]
    suffix = "" if dtype == np.float32 else "_" + np.dtype(dtype).name
    assert tensors == [t + suffix for t in ("hidden", "logs", "x")]
    assert (calibration.weight_file(model) is not None) == (route == "weight file")
    want = one_session_ranges(model, tensors, inputs)
    got = activation_ranges._ranges(model, tensors, inputs, batch=SAMPLES, role="input model")
    assert got == want  # exact: float equality of every end
    # the NaN samples were passed over, not the others: a range from the finite samples alone,
    # rounded to the pair's type (numpy's log and onnxruntime's differ in the last bit)
    finite = np.log(np.delete(inputs["x"], NEGATIVE_SAMPLES, axis=0)).astype(dtype)
    assert want["logs" + suffix] == pytest.approx((min(0.0, float(finite.min())), max(0.0, float(finite.max()))),
                                                  rel=2 * float(np.finfo(dtype).eps))
    assert want["logs" + suffix][1] < np.log(LARGE) / 2 and want["hidden" + suffix][0] < 0 < want["hidden" + suffix][1]
    assert [n.name for n in model.graph.node if n.op_type != "Cast"][:2] == ["x_Q", "x_DQ"]  # the input model as it was


def _with_pair_in(elem: int, opset: int) -> onnx.ModelProto:
    """One activation pair on a Cast of x to `elem` (its scale float below opset 19, as those
    opsets have it, else in `elem` too), cast back to float."""
    scale_type = TensorProto.FLOAT if opset < 19 or elem == TensorProto.INT32 else elem
    scale = helper.make_tensor("s", scale_type, [], [1.0])
    zero = helper.make_tensor("z", TensorProto.UINT8, [], [128])
    nodes = [helper.make_node("Cast", ["x"], ["a"], to=elem),
             helper.make_node("QuantizeLinear", ["a", "s", "z"], ["q"], name="a_Q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="a_DQ"),
             helper.make_node("Cast", ["d"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [scale, zero])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("elem, opset", [(TensorProto.BFLOAT16, 19), (TensorProto.BFLOAT16, 21),
                                         (TensorProto.INT32, 10), (TensorProto.INT32, 13), (TensorProto.INT32, 21)])
def test_pairs_the_cpu_cannot_run_are_refused_first(elem, opset):
    """A pair on bfloat16 or int32: the input model is refused when it is first run (the prune's
    held-back run, before any range is measured), so the ranges graph never meets these types —
    bfloat16 has no ReduceMin, ReduceMax or Equal on onnxruntime's CPU, and int32 no IsNaN
    (opsets below 11). If this fails, onnxruntime runs such a pair now: give the ranges graph a
    route for the type (a Cast to float is exact for bfloat16) and test it above."""
    with pytest.raises(SnpError, match="cannot run the input model"):
        calibration.Runner(_with_pair_in(elem, opset), role="input model")
