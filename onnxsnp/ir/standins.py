"""Standard-op stand-ins for onnxruntime's contrib ops, used only for shape inference.

ONNX shape inference knows no com.microsoft op, so every tensor after the first fused op of an
onnxruntime-optimized graph would lose its shape. In the light copy that `ModelGraph.shapes`
infers, each such node is replaced by standard nodes that compute tensors of the same shapes
(the values are never computed); outputs without a stand-in become shapeless graph inputs.
"""
from __future__ import annotations

import onnx
from onnx import helper


_UNARY = {"Gelu", "FastGelu", "QuickGelu", "BiasGelu", "BiasAdd", "SimplifiedLayerNormalization",
          "LayerNormalization", "BiasSoftmax", "ReorderOutput", "RotaryEmbedding"}  # RotaryEmbedding: x rotated
_SKIP_NORMS = {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}


def stand_ins(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> list[onnx.NodeProto] | None:
    """Standard nodes with the output shapes of contrib `node`; None to keep `node` as it is.
    `shapes` holds the dims of the initializers (the weights of fused ops)."""
    if node.domain in ("", "ai.onnx") and node.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
        pass  # onnxruntime registers these in the ONNX domain, where ONNX itself has no schema for them
    elif node.domain not in ("com.microsoft", "com.microsoft.nchwc"):
        return None
    op, inputs, out = node.op_type, list(node.input), list(node.output)
    if op in _UNARY:  # element-wise, or a norm: the first input's shape (plus a broadcast bias)
        if op in ("BiasGelu", "BiasAdd", "FastGelu") and len(inputs) > 1 and inputs[1]:
            return [helper.make_node("Add", inputs[:2], out[:1])]
        return [helper.make_node("Identity", inputs[:1], out[:1])]
    if op in _SKIP_NORMS:  # output 0 and the sum (output 3) have the input's shape
        nodes = [helper.make_node("Add", inputs[:2], out[:1])]
        if len(out) > 3 and out[3]:
            nodes.append(helper.make_node("Identity", out[:1], [out[3]]))
        return nodes
    if op == "FusedMatMul":
        a, b = ("...ji" if attribute(node, "transA", 0) else "...ij"), ("...kj" if attribute(node, "transB", 0) else "...jk")
        return [helper.make_node("Einsum", inputs[:2], out[:1], equation=f"{a},{b}->...ik")]
    if op == "FusedGemm":
        return [helper.make_node("Gemm", inputs[:3], out[:1], transA=attribute(node, "transA", 0),
                                 transB=attribute(node, "transB", 0))]
    if op == "MultiHeadAttention":  # (B, N, D) query: the output has its shape
        return [helper.make_node("Identity", inputs[:1], out[:1])]
    if op == "GroupQueryAttention":  # the query's first heads × head size features (packed q|k|v or q alone)
        if len(inputs) > 1 and inputs[1]:
            return [helper.make_node("Identity", inputs[:1], out[:1])]
        size = (shapes.get(inputs[3]) or [None])[-1] if len(inputs) > 3 else None  # the past keys' head size
        if not isinstance(size, int) or size <= 0:
            return None
        width = attribute(node, "num_heads", 0) * size
        return [helper.make_node("Slice", [inputs[0], f"{out[0]}/zero", f"{out[0]}/end", f"{out[0]}/last"], out[:1]),
                helper.make_node("Constant", [], [f"{out[0]}/zero"], value_ints=[0]),
                helper.make_node("Constant", [], [f"{out[0]}/end"], value_ints=[width]),
                helper.make_node("Constant", [], [f"{out[0]}/last"], value_ints=[-1])]
    if op == "Attention" and inputs[1] in shapes:  # x · W[:, :D_v]
        sizes = attribute(node, "qkv_hidden_sizes", None) or [shapes[inputs[1]][1] // 3] * 3
        return [helper.make_node("Slice", [f"{out[0]}/qkv", f"{out[0]}/zero", f"{out[0]}/end", f"{out[0]}/last"], out[:1]),
                helper.make_node("MatMul", inputs[:2], [f"{out[0]}/qkv"]),
                helper.make_node("Constant", [], [f"{out[0]}/zero"], value_ints=[0]),
                helper.make_node("Constant", [], [f"{out[0]}/end"], value_ints=[int(sizes[2])]),
                helper.make_node("Constant", [], [f"{out[0]}/last"], value_ints=[-1])]
    if op == "EmbedLayerNormalization" and inputs[2] in shapes:  # word embedding rows of input_ids
        return [helper.make_node("Gather", [inputs[2], inputs[0]], out[:1])]
    if op == "Conv":  # nchwc Conv reading NCHW: its NCHW twin, for the ReorderOutput after it
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute
                 if a.name in ("strides", "pads", "dilations", "group", "kernel_shape", "auto_pad")}
        return [helper.make_node("Conv", inputs[:3], out[:1], **attrs)]
    return None


def attribute(node: onnx.NodeProto, name: str, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def replace_contrib_ops(graph: onnx.GraphProto, shapes: dict[str, list[int]]) -> None:
    """Swap every contrib node of `graph` (a light copy) for its stand-ins, in place."""
    produced = set()
    nodes = []
    for node in graph.node:
        replaced = stand_ins(node, shapes)
        nodes += [node] if replaced is None else replaced
        if replaced is not None:
            produced |= {o for n in replaced for o in n.output}
            for missing in (o for o in node.output if o and o not in produced):
                graph.input.append(helper.make_tensor_value_info(missing, onnx.TensorProto.FLOAT, None))
    del graph.node[:]
    graph.node.extend(nodes)
