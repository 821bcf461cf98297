"""A generated corpus of bad (and borderline) inputs for the command line.

Every case is built by code from the shipped digits model or from onnx.helper, so the corpus
is reproducible and grows by changing a number, not by hand. A case is a name, the argv to
run (with {IN}/{OUT}/{TMP} placeholders) and the files to create first.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "digits_vit.onnx"


@dataclass
class Case:
    name: str
    model: bytes  # written to {IN}
    extra: list[str] = field(default_factory=list)  # further arguments
    files: dict[str, bytes] = field(default_factory=dict)  # name → content, in {TMP}
    out: str = "{TMP}/out.onnx"


def _calib(**arrays) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _tiny_graph(nodes, inputs, outputs, inits, opset: int = 17, domains=()) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]
                              + [helper.make_opsetid(d, 1) for d in domains])
    model.ir_version = 8
    return model.SerializeToString()


def _mlp(opset: int = 17) -> bytes:
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    return _tiny_graph([helper.make_node("MatMul", ["x", "w"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight], opset)


def _mutate(model: onnx.ModelProto, rng: random.Random) -> tuple[str, onnx.ModelProto]:
    """One random structural change to a copy of a valid model."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    nodes = list(copy.graph.node)
    choice = rng.randrange(8)
    node = rng.choice([n for n in nodes if n.op_type in ("Softmax", "Transpose", "Reshape", "MatMul", "Add",
                                                         "LayerNormalization", "Gemm", "Split", "Gather")])
    if choice == 0 and node.attribute:  # an attribute changed
        attribute = rng.choice(list(node.attribute))
        if attribute.type == onnx.AttributeProto.INT:
            attribute.i = rng.choice([-3, 0, 1, 2, 7])
        elif attribute.type == onnx.AttributeProto.INTS:
            values = list(attribute.ints)
            rng.shuffle(values)
            del attribute.ints[:]
            attribute.ints.extend(values)
        elif attribute.type == onnx.AttributeProto.FLOAT:
            attribute.f = rng.choice([0.0, -1.0, 1e30])
        return f"attr-{node.op_type}-{attribute.name}", copy
    if choice == 1:  # an input renamed to nothing that exists
        node.input[rng.randrange(len(node.input))] = "dangling_tensor"
        return f"dangling-{node.op_type}", copy
    if choice == 2:  # an initializer with the wrong shape
        init = rng.choice([t for t in copy.graph.initializer if len(t.dims) >= 1])
        value = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array(value.reshape(-1)[: max(1, value.size // 2)].copy(), init.name))
        return f"init-shape-{init.name[:20]}", copy
    if choice == 3:  # an op that does not exist
        node.op_type = "NoSuchOp"
        return "unknown-op", copy
    if choice == 4:  # an unknown domain
        node.domain = "com.example.unknown"
        return "unknown-domain", copy
    if choice == 5:  # a cycle: a node reads its own output
        node.input[0] = node.output[0]
        return f"cycle-{node.op_type}", copy
    if choice == 6:  # a node removed
        copy.graph.node.remove(node)
        return f"removed-{node.op_type}", copy
    # a reshape target changed
    shapes = [t for t in copy.graph.initializer if t.data_type == TensorProto.INT64 and len(t.dims) == 1]
    consts = [n for n in nodes if n.op_type == "Constant"]
    target = rng.choice(consts) if consts else None
    if target is not None:
        value = numpy_helper.to_array(target.attribute[0].t).copy()
        if value.size:
            value.reshape(-1)[rng.randrange(value.size)] = rng.choice([-1, 0, 3, 5, 999])
            target.attribute[0].t.CopyFrom(numpy_helper.from_array(value))
        return "constant-changed", copy
    return f"shape-const-{len(shapes)}", copy


def cases(mutations: int = 90) -> Iterator[Case]:
    shipped = SHIPPED.read_bytes()
    model = onnx.load(str(SHIPPED))
    pixels = np.random.default_rng(0).standard_normal((8, 1, 32, 32)).astype(np.float32)
    yield Case("empty-file", b"")
    rng = np.random.default_rng(1)
    for size in (1, 7, 64, 1000, 100_000):
        for seed in range(4):
            yield Case(f"random-bytes-{size}-{seed}", np.random.default_rng(seed * 7 + size).bytes(size))
    for fraction in np.linspace(0.01, 0.99, 40):
        yield Case(f"truncated-{fraction:.2f}", shipped[: int(len(shipped) * fraction)])
    yield Case("tensor-proto", numpy_helper.from_array(np.zeros(3, np.float32), "t").SerializeToString())
    yield Case("graph-proto", model.graph.SerializeToString())
    yield Case("node-proto", model.graph.node[0].SerializeToString())
    yield Case("text-file", b"ir_version: 8\nthis is not a model\n" * 10)
    yield Case("no-attention-mlp", _mlp())
    yield Case("opset-9-mlp", _mlp(opset=9))
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.uint8), "z")
    yield Case("quantized-qdq", _tiny_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [scale, zero]))
    weights = numpy_helper.from_array(np.ones((4, 4), np.int8), "w8")
    yield Case("integer-matmul", _tiny_graph(
        [helper.make_node("MatMulInteger", ["x", "w8"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.INT8, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 4])], [weights]))
    yield Case("unknown-domain-op", _tiny_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [], domains=("com.example",)))
    for ratio in ("-0.1", "1", "1.5", "nan", "inf", "-inf", "half", "", "0x1"):
        yield Case(f"ratio-{ratio or 'empty'}", shipped, ["--ratio", ratio])
    for flag, value in (("--heads", "1"), ("--heads", "-1"), ("--residual", "2"), ("--blocks", "4"),
                        ("--blocks", "x"), ("--blocks", "9,"), ("--target-flops", "0"), ("--target-flops", "abc"),
                        ("--target-flops", "1e-9"), ("--target-params", "-5"), ("--align", "0"),
                        ("--calib-samples", "0"), ("--calib-samples", "-3"), ("--criterion", "best"),
                        ("--compensate", "magic"), ("--qk-ratio", "1"), ("--v-ratio", "nan"), ("--ffn-ratio", "-1"),
                        ("--target-speedup", "1"), ("--target-speedup", "0.5"), ("--target-speedup", "x"),
                        ("--target-latency", "0"), ("--target-latency", "-2"), ("--target-latency", "nan")):
        yield Case(f"option{flag}-{value}", shipped, [flag, value])
    yield Case("target-flops-and-params", shipped, ["--target-flops", "0.5", "--target-params", "0.5"])
    yield Case("target-flops-and-speedup", shipped, ["--target-flops", "0.5", "--target-speedup", "2"])
    yield Case("target-speedup-and-latency", shipped, ["--target-speedup", "2", "--target-latency", "1"])
    calib_cases = {
        "missing-key": _calib(wrong=pixels),
        "wrong-rank": _calib(pixel_values=pixels[:, 0]),
        "wrong-size": _calib(pixel_values=np.zeros((8, 1, 16, 16), np.float32)),
        "nan-values": _calib(pixel_values=np.full_like(pixels, np.nan)),
        "inf-values": _calib(pixel_values=np.full_like(pixels, np.inf)),
        "strings": _calib(pixel_values=np.array(["a", "b"])),
        "empty-samples": _calib(pixel_values=np.zeros((0, 1, 32, 32), np.float32)),
        "scalar": _calib(pixel_values=np.float32(1.0)),
        "not-npz": b"garbage",
        "empty-npz-file": b"",
    }
    for name, content in calib_cases.items():
        yield Case(f"calib-{name}", shipped, ["--calib", "{TMP}/calib.npz"], {"calib.npz": content})
    yield Case("calib-file-missing", shipped, ["--calib", "{TMP}/nope.npz"])
    yield Case("output-is-input", shipped, out="{IN}")
    yield Case("output-folder-missing", shipped, out="{TMP}/no/such/dir/out.onnx")
    yield Case("output-is-a-folder", shipped, out="{TMP}")
    yield Case("report-is-output", shipped, ["--report", "{TMP}/out.onnx"])
    yield Case("report-folder-missing", shipped, ["--report", "{TMP}/none/r.json"])
    mutate_rng = random.Random(0)
    for index in range(mutations):
        name, mutated = _mutate(model, mutate_rng)
        yield Case(f"mutated-{index:03d}-{name}", mutated.SerializeToString(),
                   ["--ratio", "0.5", "--calib-samples", "8"])
    del rng
