"""Linear layers: y = x·W (+ b) as MatMul + Add, Gemm, or a MatMul whose bias lives in the
activation op after it (BiasGelu/FastGelu)."""
from __future__ import annotations

import onnx

from ..graph import ModelGraph, attribute
from .blocks import Linear


def linear_producing(g: ModelGraph, tensor: str) -> Linear | None:
    """The Linear whose output is `tensor`, if `tensor` is produced by one."""
    node = g.producer_of(tensor)
    if node is None:
        return None
    if node.op_type == "Gemm":
        return gemm_linear(g, node)
    if node.op_type == "Add":
        for i in (0, 1):
            bias, other = node.input[i], node.input[1 - i]
            value = g.constant(bias)
            matmul = g.producer_of(other)
            if value is None or value.ndim != 1 or matmul is None or matmul.op_type != "MatMul":
                continue
            linear = matmul_linear(g, matmul)
            if linear is not None and value.shape[0] == linear.out_features and len(g.consumers.get(other, [])) == 1:
                return Linear(linear.node, linear.weight, 1, False, node.name, bias, i, linear.input,
                              node.output[0], linear.in_features, linear.out_features)
        return None
    if node.op_type == "MatMul":
        return matmul_linear(g, node)
    return None


def linear_reading(g: ModelGraph, tensor: str) -> Linear | None:
    """The Linear that reads `tensor` as its activation input (the sole consumer)."""
    consumers = g.consumers_of(tensor)
    if len(consumers) != 1 or consumers[0].op_type not in ("MatMul", "Gemm") or consumers[0].input[0] != tensor:
        return None
    return linear_at(g, consumers[0])


def linear_at(g: ModelGraph, node: onnx.NodeProto) -> Linear | None:
    """The Linear computed by MatMul/Gemm `node`, with the bias Add that follows a MatMul."""
    if node.op_type == "Gemm":
        return gemm_linear(g, node)
    if node.op_type != "MatMul":
        return None
    after = g.consumers_of(node.output[0])
    if len(after) == 1 and after[0].op_type == "Add":
        with_bias = linear_producing(g, after[0].output[0])
        if with_bias is not None and with_bias.node == node.name:
            return with_bias
    return matmul_linear(g, node)


def matmul_linear(g: ModelGraph, node: onnx.NodeProto) -> Linear | None:
    weight = g.constant(node.input[1])
    if weight is None or weight.ndim != 2 or g.is_constant(node.input[0]):
        return None
    return Linear(node.name, node.input[1], 1, False, None, None, -1, node.input[0], node.output[0],
                  int(weight.shape[0]), int(weight.shape[1]))


def gemm_linear(g: ModelGraph, node: onnx.NodeProto) -> Linear | None:
    weight = g.constant(node.input[1])
    if weight is None or weight.ndim != 2 or attribute(node, "transA", 0):
        return None
    if attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0:
        return None  # scaled Gemm: not the plain x·W + b that slicing and refits assume
    transposed = bool(attribute(node, "transB", 0))
    out_features = weight.shape[0] if transposed else weight.shape[1]
    in_features = weight.shape[1] if transposed else weight.shape[0]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None:
        value = g.constant(bias)
        if value is None or value.size != out_features or value.ndim > 1:
            return None  # a broadcast or run-time C cannot follow a sliced output
    return Linear(node.name, node.input[1], 1, transposed, node.name if bias else None, bias, 2,
                  node.input[0], node.output[0], int(in_features), int(out_features))


def bias_activation_fc1(g: ModelGraph, node: onnx.NodeProto) -> Linear | None:
    if node.op_type not in ("BiasGelu", "FastGelu") or len(node.input) < 2 or not node.input[1]:
        return None
    matmul = g.producer_of(node.input[0])
    bias = g.constant(node.input[1])
    if matmul is None or matmul.op_type != "MatMul" or bias is None or bias.ndim != 1:
        return None
    linear = matmul_linear(g, matmul)
    if linear is None or bias.shape[0] != linear.out_features or len(g.consumers.get(node.input[0], [])) != 1:
        return None
    return Linear(linear.node, linear.weight, 1, False, node.name, node.input[1], 1, linear.input, linear.output,
                  linear.in_features, linear.out_features)
