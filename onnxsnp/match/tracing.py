"""Tracing an attention's operands through the graph: from a score operand back to its projection
(through layout ops, scales, activation QDQ pairs, a rotary embedding, a KV cache join, a
QK-norm, a q/k/v selector), and from attn·V forward to the output projection."""
from __future__ import annotations

from dataclasses import dataclass, replace

import onnx

from .blocks import FrozenScale, KvCache, Linear, NoMatch, Part, Rotary, ShapeEdit, Width
from .decoder import kv_cache_join, onnx_rotary_op, ort_rotary_op, rotary_producing
from .linear import linear_producing, linear_reading
from .norms import Norm, norm_writing
from .partial_rotary import partial_rotary_producing
from ..ir.graph import ModelGraph

# Ops that only move, reshape, select or cast data between a projection and the score MatMul
# (Expand: grouped-query attention repeating key/value heads).
_LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Split", "Gather", "Slice", "Expand",
               "Cast"}  # OLMo 2 casts rotated q/k to the compute type


SCALE_OPS = {"Mul", "Div"}
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def activation_qdq(g: ModelGraph, node: onnx.NodeProto) -> bool:
    """Is `node` a per-tensor QuantizeLinear/DequantizeLinear of an activation? Such a pair is
    element-wise with one scale, so it passes like Identity; a per-channel one is refused by name."""
    if node.op_type not in _QDQ or g.is_constant(node.input[0]):
        return False  # a weight's DequantizeLinear is part of the (constant) weight
    if any(g.constant(t) is None or g.constant(t).size != 1 for t in node.input[1:3] if t):
        raise NoMatch(f"{node.op_type} node {node.name} quantizes activations per channel")
    return True


@dataclass(frozen=True)
class Trace:
    """What was passed on the way from a score operand back to its projection."""

    linear: Linear
    nodes: tuple[onnx.NodeProto, ...]  # from the operand back to the projection (exclusive)
    scales: tuple[FrozenScale, ...]
    part: int | None = None  # which of q/k/v a fused projection's selector took
    part_tensor: str | None = None  # the selector's output on this path
    selector: int | None = None  # the selector's index in `nodes`
    rotary: Rotary | None = None  # a rotary embedding on the way (its Add is in `nodes`)
    rotary_edits: tuple[ShapeEdit, ...] = ()
    half: int | None = None  # the rotary's split point, where it is a literal
    kv: KvCache | None = None  # a KV cache joined on the way (its Concat is in `nodes`)
    norm: Norm | None = None  # a QK-norm on the way (its last node is in `nodes`)


def is_scalar(g: ModelGraph, tensor: str) -> bool:
    value = g.constant(tensor)
    if value is not None:
        return value.size == 1
    shape = g.shapes.get(tensor)
    return shape is not None and all(d == 1 for d in shape)


def trace_to_linear(g: ModelGraph, tensor: str, path: Part) -> Trace:
    """From the score operand `tensor` of the `path` (q, k or v) back to its projection: a KV cache
    joined on the way holds that part, and a QK-norm may sit on q or k only."""
    nodes: list[onnx.NodeProto] = []
    scales: list[FrozenScale] = []
    part: int | None = None
    part_tensor: str | None = None
    selector: int | None = None
    rotary_found: tuple[Rotary, tuple[ShapeEdit, ...], int | None] | None = None  # each at most once on the way
    kv: KvCache | None = None
    norm: Norm | None = None
    for _ in range(24):
        linear = linear_producing(g, tensor)
        if linear is not None:
            rotary, edits, half = rotary_found or (None, (), None)
            return Trace(linear, tuple(nodes), tuple(scales), part, part_tensor, selector, rotary, edits, half, kv, norm)
        node = g.producer_of(tensor)
        if node is None:
            raise NoMatch(f"{tensor} does not come from a projection with constant weights")
        rotated = rotary_producing(g, tensor) if node.op_type == "Add" else \
            partial_rotary_producing(g, tensor) if node.op_type == "Concat" else None
        if node.op_type == "RotaryEmbedding" and node.domain in ("", "ai.onnx"):  # opset 23's op
            rotated = (onnx_rotary_op(g, node), [], None)
        op = ort_rotary_op(g, node, tensor)  # com.microsoft's
        if op is not None:
            rotated = (op, [], None)
        if rotated is not None:
            if rotary_found is not None:
                raise NoMatch(f"two rotary embeddings on the way to the projection ({node.name})")
            edits = tuple(replace(e, width=Width.KV_HEADS) if path is Part.KEY and e.width is Width.HEADS else e
                          for e in rotated[1])  # k's heads are the key/value heads (before any repeat)
            rotary_found = (rotated[0], edits, rotated[2])
            nodes.append(node)
            tensor = rotated[0].input
            continue
        joined = kv_cache_join(g, node, tensor, path) if node.op_type == "Concat" else None
        if joined is not None:
            if kv is not None:
                raise NoMatch(f"two KV caches on the way to the projection ({node.name})")
            kv, tensor = joined
            nodes.append(node)
            continue
        found_norm = norm_writing(g, tensor) if path is not Part.VALUE else None
        if found_norm is not None:  # QK-norm: element-wise but for a statistic over the last axis
            if norm is not None:
                raise NoMatch(f"two norms on the way to the projection ({node.name})")
            norm = found_norm
            nodes.append(node)
            tensor = norm.input
            continue
        if node.op_type in SCALE_OPS:
            data, scale = node.input[0], node.input[1]
            if not is_scalar(g, scale):
                raise NoMatch(f"{node.name} scales by a non-scalar")
            scales.append(FrozenScale(node.name, 1, scale, constant=g.is_constant(scale)))
            nodes.append(node)
            tensor = data
            continue
        if node.op_type not in _LAYOUT_OPS and not activation_qdq(g, node):
            raise NoMatch(f"{node.op_type} node {node.name} between a projection and the scores")
        if node.op_type in ("Split", "Gather", "Slice"):
            if part is not None:
                raise NoMatch(f"two selections on the way to the projection ({node.name})")
            part, part_tensor, selector = _selected_part(g, node, tensor), tensor, len(nodes)
        nodes.append(node)
        tensor = node.input[0]
    raise NoMatch("projection not found within 24 ops")


def _selected_part(g: ModelGraph, node: onnx.NodeProto, tensor: str) -> int:
    """Which of the 3 q/k/v parts a Split/Gather/Slice on the fused tensor picks."""
    if node.op_type == "Split":
        if len(node.output) != 3:
            raise NoMatch(f"{node.name} splits into {len(node.output)} parts, not q/k/v")
        return list(node.output).index(tensor)
    if node.op_type == "Gather":
        index = g.constant(node.input[1])
        if index is None or index.size != 1:
            raise NoMatch(f"{node.name} gathers a run-time index")
        return int(index.reshape(-1)[0]) % 3
    starts, ends = g.constant(node.input[1]), g.constant(node.input[2])
    if starts is None or ends is None or starts.size != 1:
        raise NoMatch(f"{node.name} is not a single-part slice")
    if int(ends.reshape(-1)[0]) - int(starts.reshape(-1)[0]) == 1:  # one of the (…, 3, H, d) axis
        return int(starts.reshape(-1)[0]) % 3
    return _feature_part(g, node)


def _feature_part(g: ModelGraph, node: onnx.NodeProto) -> int:
    """Which of q | k | v a Slice of the fused projection's features takes (Phi-3's qkv_proj:
    three Slices along the last axis, q first): its place among the three by where they start."""
    slices = [c for c in g.consumers_of(node.input[0]) if c.op_type == "Slice"]
    starts = [g.constant(c.input[1]) for c in slices]
    if len(slices) != 3 or any(s is None or s.size != 1 for s in starts):
        raise NoMatch(f"{node.name} is not a single-part slice, nor one of three slices of a q | k | v projection")
    order = sorted(range(3), key=lambda i: int(starts[i].reshape(-1)[0]))
    return order.index(slices.index(node))


def forward_to_linear(g: ModelGraph, tensor: str) -> tuple[Linear, list[onnx.NodeProto]]:
    path: list[onnx.NodeProto] = []
    while len([n for n in path if n.op_type not in _QDQ]) < 8:  # a static QDQ model's pairs are not counted
        linear = linear_reading(g, tensor, sizes_read=True)  # Shape readers: checked with the region
        if linear is not None:
            return linear, path
        consumers = g.consumers_of(tensor)
        consumers = [c for c in consumers if c.op_type != "Shape"]
        if len(consumers) != 1 or consumers[0].op_type not in ("Transpose", "Reshape", "Identity") and \
                not activation_qdq(g, consumers[0]):
            break
        path.append(consumers[0])
        tensor = consumers[0].output[0]
    raise NoMatch("no output projection after attn·V")
