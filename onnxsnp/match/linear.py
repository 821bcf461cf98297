"""Linear layers: y = x·W (+ b) with a constant W.

The product is a MatMul, a Gemm or com.microsoft.FusedMatMul (transB read as a transposed
weight); the bias is the Gemm's C, an Add after the product, or the bias input of a
BiasGelu/FastGelu that follows it. A static QDQ model (onnxruntime's quantize_static) puts a
per-tensor QuantizeLinear → DequantizeLinear pair on the product's output before the bias Add:
one scale for every channel, so the pair stays valid for a narrower output and the Add is still
the layer's bias. Around a 2-D product, onnxruntime's optimizer leaves
Reshapes that flatten the tokens before it and restore them after it: they belong to the
layer, and their last entry holds its width (`Linear.in_reshape`/`out_reshape`).
"""
from __future__ import annotations

from enum import Enum

import onnx

from ..ir.graph import ModelGraph, attribute
from .blocks import Linear
from .shapes import read_entries

_PRODUCTS = ("MatMul", "Gemm", "FusedMatMul")


def linear_at(g: ModelGraph, node: onnx.NodeProto) -> Linear | None:
    """The Linear computed by product `node`, with its bias and flattening Reshapes."""
    product = _product(g, node)
    if product is None:
        return None
    weight, transposed, in_features, out_features = product
    output, bias_node, bias, bias_index = node.output[0], None, None, -1
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias_node, bias, bias_index = node.name, node.input[2], 2
    elif node.op_type != "Gemm":
        product_output = _after_qdq(g, output)
        after = g.consumers_of(product_output)
        if len(after) == 1 and after[0].op_type == "Add":
            index = _bias_index(g, after[0], product_output, out_features)
            if index is not None:
                bias_node, bias, bias_index, output = after[0].name, after[0].input[index], index, after[0].output[0]
    source, in_reshape = _before_flatten(g, node.input[0], in_features)
    output, out_reshape = _after_unflatten(g, output, out_features)
    return Linear(node.name, weight, 1, transposed, bias_node, bias, bias_index, source, output,
                  in_features, out_features, in_reshape, out_reshape)


def linear_producing(g: ModelGraph, tensor: str) -> Linear | None:
    """The Linear whose output is `tensor`, if `tensor` is produced by one."""
    node = g.producer_of(tensor)
    if node is not None and node.op_type == "Reshape":  # maybe the token dims restored after a 2-D product
        node = g.producer_of(node.input[0])
    if node is not None and node.op_type == "Add":
        node = next((p for p in (g.producer_of(_before_qdq(g, t)) for t in node.input)
                     if p is not None and p.op_type in _PRODUCTS), None)
    if node is None or node.op_type not in _PRODUCTS:
        return None
    linear = linear_at(g, node)
    return linear if linear is not None and linear.output == tensor else None


def linear_reading(g: ModelGraph, tensor: str, sizes_read: bool = False) -> Linear | None:
    """The Linear that reads `tensor` as its activation input (the sole consumer; with `sizes_read`
    Shape readers beside it are let be: where the caller checks them, as GPT-2's Conv1D reads its
    input's shape to flatten and restore the tokens around a 2-D Gemm)."""
    consumers = g.consumers_of(tensor)
    if sizes_read:
        consumers = [c for c in consumers if c.op_type != "Shape"]
    if len(consumers) == 1 and consumers[0].op_type == "Reshape":  # maybe tokens flattened for a 2-D product
        consumers = g.consumers_of(consumers[0].output[0])
    if len(consumers) != 1 or consumers[0].op_type not in _PRODUCTS:
        return None
    linear = linear_at(g, consumers[0])
    return linear if linear is not None and linear.input == tensor else None


def matmul_linear(g: ModelGraph, node: onnx.NodeProto) -> Linear | None:
    """The bare product of a MatMul with a constant weight: no bias, no reshapes."""
    product = _product(g, node) if node.op_type == "MatMul" else None
    if product is None:
        return None
    weight, transposed, in_features, out_features = product
    return Linear(node.name, weight, 1, transposed, None, None, -1, node.input[0], node.output[0],
                  in_features, out_features)


def bias_activation_fc1(g: ModelGraph, node: onnx.NodeProto) -> Linear | None:
    """The fc1 of BiasGelu/FastGelu(x·W, b): the activation op holds the bias."""
    if node.op_type not in ("BiasGelu", "FastGelu") or len(node.input) < 2 or not node.input[1]:
        return None
    product = g.producer_of(node.input[0])
    bias = g.constant(node.input[1])
    if product is None or product.op_type not in _PRODUCTS or bias is None or bias.ndim != 1:
        return None
    linear = linear_at(g, product)
    if linear is None or linear.bias is not None or linear.output != node.input[0] or \
            bias.shape[0] != linear.out_features or len(g.consumers.get(node.input[0], [])) != 1:
        return None
    return Linear(linear.node, linear.weight, 1, linear.transposed, node.name, node.input[1], 1, linear.input,
                  linear.output, linear.in_features, linear.out_features, linear.in_reshape)


def _product(g: ModelGraph, node: onnx.NodeProto) -> tuple[str, bool, int, int] | None:
    """(weight, stored as [out, in], in features, out features) of a plain x·W product."""
    if node.op_type not in _PRODUCTS or len(node.input) < 2 or g.is_constant(node.input[0]):
        return None
    weight = g.constant(node.input[1])
    if weight is None or weight.ndim != 2 or attribute(node, "transA", 0):
        return None
    if attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0:
        return None  # a scaled product: not the plain x·W + b that slicing and refits assume
    if attribute(node, "transBatchA", 0) or attribute(node, "transBatchB", 0):
        return None
    transposed = node.op_type != "MatMul" and bool(attribute(node, "transB", 0))
    out_features, in_features = weight.shape if transposed else weight.shape[::-1]
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = g.constant(node.input[2])
        if bias is None or bias.size != out_features or bias.ndim > 1:
            return None  # a broadcast or run-time C cannot follow a sliced output
    return node.input[1], transposed, int(in_features), int(out_features)


def per_tensor_qdq(g: ModelGraph, node: onnx.NodeProto | None, op: str) -> bool:
    """Is `node` a QuantizeLinear/DequantizeLinear (`op`) of an activation with one scale and zero
    point? Such a node is element-wise with the same step for every channel."""
    if node is None or node.op_type != op or g.is_constant(node.input[0]):
        return False
    return all(g.constant(t) is not None and g.constant(t).size == 1 for t in node.input[1:3] if t)


def _after_qdq(g: ModelGraph, tensor: str) -> str:
    """The output of the activation QDQ pair that is `tensor`'s only reader, else `tensor`."""
    readers = g.consumers_of(tensor)
    if len(readers) != 1 or not per_tensor_qdq(g, readers[0], "QuantizeLinear") or tensor in g.graph_outputs:
        return tensor
    dequantize = g.consumers_of(readers[0].output[0])
    if len(dequantize) != 1 or not per_tensor_qdq(g, dequantize[0], "DequantizeLinear"):
        return tensor
    return dequantize[0].output[0]


def _before_qdq(g: ModelGraph, tensor: str) -> str:
    """The input of the activation QDQ pair that produces `tensor` (and nothing else reads), else `tensor`."""
    dequantize = g.producer_of(tensor)
    if not per_tensor_qdq(g, dequantize, "DequantizeLinear"):
        return tensor
    quantize = g.producer_of(dequantize.input[0])
    if not per_tensor_qdq(g, quantize, "QuantizeLinear") or len(g.consumers.get(dequantize.input[0], [])) != 1:
        return tensor
    return quantize.input[0] if _after_qdq(g, quantize.input[0]) == tensor else tensor


def _bias_index(g: ModelGraph, add: onnx.NodeProto, product: str, width: int) -> int | None:
    """Which input of `add` is a constant [width] bias added to `product`."""
    if len(g.consumers.get(product, [])) != 1:
        return None
    for index in (0, 1):
        value = g.constant(add.input[index])
        if add.input[1 - index] == product and value is not None and value.ndim == 1 and value.shape[0] == width:
            return index
    return None


class LastEntry(Enum):
    """How a Reshape that only regroups the leading axes writes the last one (the layer's width)."""

    LITERAL = "literal"  # as the number: the entry is edited when the width is cut
    FOLLOWS = "follows"  # inferred (-1) or read from the input's own width: it follows the cut


def _keeps_last_axis(g: ModelGraph, reshape: onnx.NodeProto, width: int) -> LastEntry | None:
    """How `reshape` writes the last axis if it only regroups the leading axes of a tensor whose
    last axis is `width`; None if it is something else."""
    before, after = g.shapes.get(reshape.input[0]), g.shapes.get(reshape.output[0])
    if not before or not after or before[-1] != width or after[-1] != width:
        return None
    shape = g.constant(reshape.input[1])
    if shape is None:  # built at run time (GPT-2's Conv1D: x.shape[:-1] + (width,)): the last entry may be literal
        read = read_entries(g, reshape.input[1], {reshape.input[0]})
        last = read[-1] if read else None
        if last is None or last.value != width:
            return None
        return LastEntry.FOLLOWS if last.follows else LastEntry.LITERAL
    if shape.ndim != 1:
        return None
    entries = [int(x) for x in shape]
    if entries[-1] == width:
        return LastEntry.LITERAL
    if entries[-1] == -1 and entries.count(-1) == 1 and 0 not in entries[:-1]:
        return LastEntry.FOLLOWS
    return None


def _before_flatten(g: ModelGraph, tensor: str, width: int) -> tuple[str, str | None]:
    """(the layer's real input, the Reshape that flattened its tokens if its width is literal)."""
    node = g.producer_of(tensor)
    kind = _keeps_last_axis(g, node, width) if node is not None and node.op_type == "Reshape" else None
    if kind is None or len(g.shapes.get(tensor) or ()) != 2:
        return tensor, None
    return node.input[0], node.name if kind is LastEntry.LITERAL else None


def _after_unflatten(g: ModelGraph, tensor: str, width: int) -> tuple[str, str | None]:
    """(the layer's real output, the Reshape that restored its tokens if its width is literal)."""
    readers = g.consumers_of(tensor)
    if len(readers) != 1 or readers[0].op_type != "Reshape" or len(g.shapes.get(tensor) or ()) != 2 or \
            tensor in g.graph_outputs:
        return tensor, None
    kind = _keeps_last_axis(g, readers[0], width)
    if kind is None:
        return tensor, None
    return readers[0].output[0], readers[0].name if kind is LastEntry.LITERAL else None
