"""Small hand-built graphs, one per attention form, for fast unit tests of the match rules.

Every graph is x (B, N, D) → attention → output projection (B, N, D); D = HEADS · HEAD_DIM.
Weights are seeded random, so a test can run the graph in onnxruntime and compare."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HEADS, HEAD_DIM, TOKENS = 2, 4, 5
WIDTH = HEADS * HEAD_DIM


class Builder:
    """Nodes and initializers with generated names; `model()` wraps them with x in and y out."""

    def __init__(self, seed: int = 0, opset: int = 17):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.opset = opset
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, value, base: str = "c") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, *shape: int, base: str = "w") -> str:
        return self.const((self.rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), base)

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, domain: str = "", **attrs) -> list[str] | str:
        names = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name(op_type), domain=domain, **attrs))
        return names[0] if outputs == 1 else names

    def linear(self, x: str, d_in: int, d_out: int, bias: bool = True) -> str:
        y = self.op("MatMul", [x, self.weight(d_in, d_out)])
        return self.op("Add", [y, self.const(self.rng.standard_normal(d_out).astype(np.float32) * 0.1, "b")]) \
            if bias else y

    def split_heads(self, t: str, perm=(0, 2, 1, 3)) -> str:
        shaped = self.op("Reshape", [t, self.const(np.array([0, 0, HEADS, HEAD_DIM], dtype=np.int64))])
        return self.op("Transpose", [shaped], perm=list(perm))

    def merge_heads(self, t: str) -> str:
        moved = self.op("Transpose", [t], perm=[0, 2, 1, 3])
        return self.op("Reshape", [moved, self.const(np.array([0, 0, WIDTH], dtype=np.int64))])

    def model(self, y: str, domains: tuple[str, ...] = ()) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [y], ["y"], name="output"))
        graph = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, WIDTH])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], self.inits)
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, 1) for d in domains]
        return helper.make_model(graph, opset_imports=opsets)


def softmax_attention(qdq: str | None = None) -> onnx.ModelProto:
    """Separate q/k/v projections, Softmax(q·kᵀ/√d)·v written out op by op; `qdq` "tensor" or
    "channel": q's activation quantized and dequantized on its way (uint8, per tensor or channel)."""
    b = Builder(opset=13)
    q, k, v = (b.linear("x", WIDTH, WIDTH) for _ in range(3))
    if qdq is not None:
        shape = () if qdq == "tensor" else (WIDTH,)
        scale, zero = b.const(np.full(shape, 0.02, np.float32)), b.const(np.full(shape, 128, np.uint8))
        q = b.op("DequantizeLinear", [b.op("QuantizeLinear", [q, scale, zero], axis=-1), scale, zero], axis=-1)
    q, v = b.split_heads(q), b.split_heads(v)
    k = b.split_heads(k, perm=(0, 2, 3, 1))  # kᵀ
    scores = b.op("MatMul", [q, k])
    scaled = b.op("Mul", [scores, b.const(np.array(HEAD_DIM ** -0.5, dtype=np.float32))])
    probs = b.op("Softmax", [scaled], axis=-1)
    context = b.merge_heads(b.op("MatMul", [probs, v]))
    return b.model(b.linear(context, WIDTH, WIDTH))


def fused_qkv(selector: str = "Split", split_first: bool = False) -> onnx.ModelProto:
    """One [D, 3D] projection reshaped to (B, N, 3, H, d); q, k, v taken by `selector` (Split,
    Slice or a scalar Gather) after the (3, B, H, N, d) transpose, or — `split_first`, as
    onnxruntime's transpose optimizer leaves it — taken along axis 2 first and transposed after."""
    b = Builder(opset=18)
    qkv = b.linear("x", WIDTH, 3 * WIDTH)
    heads = b.op("Reshape", [qkv, b.const(np.array([0, 0, 3, HEADS, HEAD_DIM], dtype=np.int64))])
    perm = [2, 0, 3, 1, 4]
    if split_first:
        parts = b.op("Split", [heads, b.const(np.array([1, 1, 1], dtype=np.int64))], outputs=3, axis=2)
        parts = [b.op("Squeeze", [b.op("Transpose", [p], perm=perm), b.const(np.array([0], dtype=np.int64))])
                 for p in parts]
    else:
        moved = b.op("Transpose", [heads], perm=perm)
        if selector == "Split":
            parts = b.op("Split", [moved, b.const(np.array([1, 1, 1], dtype=np.int64))], outputs=3, axis=0)
        elif selector == "Slice":
            parts = [b.op("Slice", [moved, b.const(np.array([i], dtype=np.int64)), b.const(np.array([i + 1], dtype=np.int64)),
                                    b.const(np.array([0], dtype=np.int64))]) for i in range(3)]
        if selector != "Gather":
            parts = [b.op("Squeeze", [p, b.const(np.array([0], dtype=np.int64))]) for p in parts]
        else:
            parts = [b.op("Gather", [moved, b.const(np.array(i, dtype=np.int64))], axis=0) for i in range(3)]
    q, k, v = parts
    scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])
    probs = b.op("Softmax", [b.op("Mul", [scores, b.const(np.array(HEAD_DIM ** -0.5, dtype=np.float32))])], axis=-1)
    context = b.merge_heads(b.op("MatMul", [probs, v]))
    return b.model(b.linear(context, WIDTH, WIDTH))


def fused_split() -> onnx.ModelProto:
    """One [D, 3D] projection split along its features into q | k | v (GPT-2's c_attn), each
    part split into heads on its own."""
    b = Builder(opset=18)
    qkv = b.linear("x", WIDTH, 3 * WIDTH)
    parts = b.op("Split", [qkv, b.const(np.array([WIDTH] * 3, dtype=np.int64))], outputs=3, axis=-1)
    q, k, v = (b.split_heads(p) for p in parts)
    scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])
    probs = b.op("Softmax", [b.op("Mul", [scores, b.const(np.array(HEAD_DIM ** -0.5, dtype=np.float32))])], axis=-1)
    context = b.merge_heads(b.op("MatMul", [probs, v]))
    return b.model(b.linear(context, WIDTH, WIDTH))


def conv1d_out_projection() -> onnx.ModelProto:
    """Separate projections; the output projection as GPT-2's Conv1D saved by onnxruntime's session
    optimizer: the tokens flattened by a Reshape whose target reads the input's own width through
    Shape (x.view(-1, x.size(-1))), a Gemm, and a Reshape restoring the tokens, so that a Shape
    reads the merged heads beside the flattening Reshape."""
    b = Builder()
    i64 = lambda *v: b.const(np.array(v, dtype=np.int64))  # noqa: E731
    q, k, v = (b.split_heads(b.linear("x", WIDTH, WIDTH)) for _ in range(3))
    scores = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])]),
                          b.const(np.array(HEAD_DIM ** -0.5, dtype=np.float32))])
    context = b.merge_heads(b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v]))
    shape = b.op("Shape", [context])
    flat = b.op("Reshape", [context, b.op("Concat", [i64(-1), b.op("Slice", [shape, i64(-1), i64(2 ** 62)])], axis=0)])
    product = b.op("Gemm", [flat, b.weight(WIDTH, WIDTH), b.const(b.rng.standard_normal(WIDTH).astype(np.float32), "b")])
    tokens = b.op("Concat", [b.op("Slice", [shape, i64(0), i64(-1)]), i64(WIDTH)], axis=0)
    return b.model(b.op("Reshape", [product, tokens]))


def fused_matmul_scores() -> onnx.ModelProto:
    """Separate projections; the scores as com.microsoft.FusedMatMul(q, k, transB=1, alpha=1/√d)."""
    b = Builder()
    q, k, v = (b.split_heads(b.linear("x", WIDTH, WIDTH)) for _ in range(3))
    scores = b.op("FusedMatMul", [q, k], domain="com.microsoft", transB=1, alpha=HEAD_DIM ** -0.5)
    context = b.merge_heads(b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v]))
    return b.model(b.linear(context, WIDTH, WIDTH), ("com.microsoft",))


def onnx_attention() -> onnx.ModelProto:
    """The ONNX Attention op (opset 23) on 4-D (B, H, N, d) inputs."""
    b = Builder(opset=23)
    q, k, v = (b.split_heads(b.linear("x", WIDTH, WIDTH)) for _ in range(3))
    context = b.merge_heads(b.op("Attention", [q, k, v]))
    return b.model(b.linear(context, WIDTH, WIDTH))


def ort_attention() -> onnx.ModelProto:
    """com.microsoft.Attention with one packed [D, 3D] weight and bias."""
    b = Builder()
    bias = b.const(b.rng.standard_normal(3 * WIDTH).astype(np.float32) * 0.1, "b")
    context = b.op("Attention", ["x", b.weight(WIDTH, 3 * WIDTH), bias], domain="com.microsoft", num_heads=HEADS)
    return b.model(b.linear(context, WIDTH, WIDTH), ("com.microsoft",))


def ort_multi_head_attention() -> onnx.ModelProto:
    """com.microsoft.MultiHeadAttention on three bias-free projections and a packed bias."""
    b = Builder()
    q, k, v = (b.linear("x", WIDTH, WIDTH, bias=False) for _ in range(3))
    bias = b.const(b.rng.standard_normal(3 * WIDTH).astype(np.float32) * 0.1, "b")
    context = b.op("MultiHeadAttention", [q, k, v, bias], domain="com.microsoft", num_heads=HEADS)
    return b.model(b.linear(context, WIDTH, WIDTH), ("com.microsoft",))


def contrib_attention(op_type: str) -> onnx.ModelProto:
    """A com.microsoft attention op on separate q, k, v projections (for ops onnxsnp refuses by name)."""
    b = Builder()
    q, k, v = (b.linear("x", WIDTH, WIDTH) for _ in range(3))
    context = b.op(op_type, [q, k, v], domain="com.microsoft", num_heads=HEADS)
    return b.model(b.linear(context, WIDTH, WIDTH), ("com.microsoft",))


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]
