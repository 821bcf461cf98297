"""Size and compute of a model: parameters, and MACs of MatMul/Gemm/Conv (and onnxruntime's fused
and quantized forms of them: FusedMatMul, MatMulNBits, MatMulInteger) and attention ops, from
run-time shapes given (running the model for them is verify/observation.py's `node_macs`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from .graph import attribute


@dataclass(frozen=True)
class ModelStats:
    params: int
    macs: int  # multiply-accumulates per sample; FLOPs = 2 × MACs

    @property
    def flops(self) -> int:
        return 2 * self.macs


def count_params(model: onnx.ModelProto) -> int:
    """Floating-point weights (initializers and Constant nodes) and quantized ones (integer
    initializers read by DequantizeLinear, a Cast or MatMulInteger, or gathered and then
    dequantized); int shape constants excluded."""
    total = 0
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    dequantized = {n.input[0] for n in model.graph.node if n.op_type in ("DequantizeLinear", "Cast") and n.input}
    # quantize_dynamic's products read their int8 weight directly (its scale is applied to the
    # output), and its embedding tables are gathered as integers, then dequantized
    dequantized |= {t for n in model.graph.node if n.op_type == "MatMulInteger" for t in n.input[:2]}
    dequantizing = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input}
    dequantized |= {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.output[0] in dequantizing}
    # QOperator: products read their integer weight as input 3, and embedding tables are gathered
    # as integers straight into a QLinear op
    dequantized |= {n.input[3] for n in model.graph.node if n.op_type in _QLINEAR}
    into_qlinear = {t for n in model.graph.node if n.op_type.startswith("QLinear") for t in n.input}
    dequantized |= {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.output[0] in into_qlinear}
    for node in model.graph.node:  # block-quantized weights: K × N of them, however they are packed
        if node.op_type == "MatMulNBits":
            total += int(attribute(node, "K", 0)) * int(attribute(node, "N", 0))
    for tensor in model.graph.initializer:
        if tensor.data_type in float_types or tensor.name in dequantized and tensor.data_type in (
                onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            total += int(np.prod(tensor.dims, dtype=np.int64))
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = attribute(node, "value")
            if value is not None and value.data_type in float_types:
                total += int(np.prod(value.dims, dtype=np.int64))
    return total


def shape_tensors(model: onnx.ModelProto) -> list[str]:
    """The run-time tensors whose shapes `macs_from_shapes` needs."""
    initializers = {t.name for t in model.graph.initializer}
    return list(dict.fromkeys(t for n in _counted(model) for t in (n.input[:1] if n.op_type == "GroupQueryAttention" else
                                                                    n.input[:3] if "Attention" in n.op_type else
                                                                    (n.input[0], n.input[_weight(n)], n.output[0]))
                              if t not in initializers))


def macs_from_shapes(model: onnx.ModelProto, run_shapes: dict[str, tuple[int, ...]], samples: int) -> dict[str, int]:
    """`node_macs` from the shapes of `shape_tensors` seen in a run over `samples` samples."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer} | dict(run_shapes)
    per_node: dict[str, int] = {}
    for node in _counted(model):
        total = 0
        if node.op_type == "Attention" and node.domain == "com.microsoft":  # packed projection + attention
            x, weight = shapes[node.input[0]], shapes[node.input[1]]
            heads = attribute(node, "num_heads", 1)
            q_width, _, v_width = attribute(node, "qkv_hidden_sizes", None) or [weight[1] // 3] * 3
            tokens = x[-2] if len(x) == 3 else 1
            total += int(np.prod(x[:-1], dtype=np.int64)) * weight[0] * weight[1]
            total += int(np.prod(x[:-1], dtype=np.int64)) * tokens * (q_width + v_width) // heads * heads
        elif node.op_type == "GroupQueryAttention":  # Q·Kᵀ and attn·V over the new tokens (prefill, no past)
            q, heads, kv_heads = shapes[node.input[0]], attribute(node, "num_heads", 1), attribute(node, "kv_num_heads", 1)
            separate = len(node.input) > 1 and node.input[1]
            size = q[-1] // heads if separate else q[-1] // (heads + 2 * kv_heads)
            total += int(np.prod(q[:-1], dtype=np.int64)) * (q[-2] if len(q) == 3 else 1) * heads * 2 * size
        elif node.op_type in ("Attention", "MultiHeadAttention"):  # Q·Kᵀ and attn·V inside one op
            q, k, v = (shapes[t] for t in node.input[:3])
            total += int(np.prod(q[:-1], dtype=np.int64)) * k[-2] * (q[-1] + v[-1])
        else:
            total += _linear_macs(node, shapes)
        per_node[node.name] = total // max(samples, 1)
    return per_node


def _counted(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv", "Attention", "MultiHeadAttention",
                                                          "FusedMatMul", "FusedGemm", "MatMulNBits",
                                                          "GroupQueryAttention", "MatMulInteger", *_QLINEAR)]


# QOperator products: their second operand is input 3 (inputs 1 and 2 are the first's scale and zero point)
_QLINEAR = {"QLinearMatMul": "MatMul", "QGemm": "Gemm", "QLinearConv": "Conv"}


def _weight(node: onnx.NodeProto) -> int:
    return 3 if node.op_type in _QLINEAR else 1


def _linear_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    out, a, b = shapes[node.output[0]], shapes[node.input[0]], shapes[node.input[_weight(node)]]
    outputs = int(np.prod(out, dtype=np.int64))
    op_type = _QLINEAR.get(node.op_type, node.op_type)
    if node.op_type == "MatMulNBits":
        return outputs * int(attribute(node, "K", 0))
    if op_type in ("MatMul", "FusedMatMul", "MatMulInteger"):  # FusedMatMul: onnxruntime's, with transposes inside
        return outputs * ((a[-2] if attribute(node, "transA", 0) else a[-1]) if a else 1)
    if op_type in ("Gemm", "FusedGemm"):
        return outputs * (a[0] if attribute(node, "transA", 0) else a[-1])
    # Conv: weight is (C_out, C_in / group, k…): each output element reads prod(weight[1:]) inputs
    return outputs * int(np.prod(b[1:], dtype=np.int64))


def stats_from_shapes(model: onnx.ModelProto, run_shapes: dict[str, tuple[int, ...]], samples: int) -> ModelStats:
    return ModelStats(count_params(model), sum(macs_from_shapes(model, run_shapes, samples).values()))
