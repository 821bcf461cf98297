"""Shape tensors: the entries of a Reshape's target shape, where they are read from at run time
(Shape → Gather/Slice → Concat), and the head layout a Reshape splits features into."""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..ir.graph import ModelGraph, attribute
from .blocks import NoMatch


@dataclass(frozen=True)
class Entry:
    """One entry of a Reshape's target shape."""

    value: int | None  # its value where known statically
    follows: bool = False  # read at run time from a pruned tensor's shape: it adapts by itself


def read_entries(g: ModelGraph, shape: str, region: set[str] = frozenset()) -> list[Entry] | None:
    """The entries of a shape tensor: a constant, or a Concat of constants and pieces read from
    other tensors' shapes (Shape→Gather→Unsqueeze, Shape(start, end), Slice(Shape))."""
    value = g.constant(shape)
    if value is not None:
        return [Entry(int(x)) for x in value.reshape(-1)]
    shape = _unwrapped(g, shape)
    node = g.producer_of(shape)
    pieces = node.input if node is not None and node.op_type == "Concat" else [shape]
    entries: list[Entry] = []
    for piece in pieces:
        value = g.constant(piece)
        if value is not None:
            entries += [Entry(int(x)) for x in value.reshape(-1)]
            continue
        source, factor = shape_source(g, piece), 1
        if source is None:
            source, factor = _scaled_source(g, piece)
        if source is None:  # computed some other way (a sequence length summed): unknown, but not a width
            length = g.shapes.get(piece)
            if node is None or node.op_type != "Concat" or length is None or len(length) != 1 or length[0] is None:
                return None
            entries += [Entry(None)] * length[0]
            continue
        tensor, axes = source
        entries += [Entry(None if g.dim(tensor, axis) is None else g.dim(tensor, axis) * factor, tensor in region)
                    for axis in axes]
    return entries


def _unwrapped(g: ModelGraph, shape: str) -> str:
    """The shape tensor inside what the legacy exporter wraps around an Expand's target shape:
    Reshape(s, [-1]) and Where(s == -1, 1, s)."""
    for _ in range(4):
        node = g.producer_of(shape)
        if node is None:
            break
        flat = g.constant(node.input[1]) if node.op_type == "Reshape" else None
        if flat is not None and flat.reshape(-1).tolist() == [-1]:
            shape = node.input[0]
            continue
        test = g.producer_of(node.input[0]) if node.op_type == "Where" else None
        if test is not None and test.op_type == "Equal" and node.input[2] in test.input:
            shape = node.input[2]
            continue
        break
    return shape


def _scaled_source(g: ModelGraph, tensor: str) -> tuple[tuple[str, list[int]] | None, int]:
    """(T, axes) and the factor if `tensor` is a dim of T times a constant integer (grouped-query
    attention's key/value heads × repeats)."""
    node = g.producer_of(tensor)
    while node is not None and node.op_type in ("Unsqueeze", "Cast", "Squeeze"):
        node = g.producer_of(node.input[0])
    if node is None or node.op_type != "Mul":
        return None, 1
    for index in (0, 1):
        factor = g.constant(node.input[1 - index])
        source = shape_source(g, node.input[index])
        if factor is not None and factor.size == 1 and source is not None:
            return source, int(factor.reshape(-1)[0])
    return None, 1


def shape_entries(g: ModelGraph, shape: str) -> list[int | None] | None:
    entries = read_entries(g, shape)
    return None if entries is None else [e.value for e in entries]


def shape_source(g: ModelGraph, tensor: str) -> tuple[str, list[int]] | None:
    """(T, axes) if `tensor` holds dims `axes` of T, read through Shape and any chain of Gather
    and Slice (an optimizer's Gather(Shape(x), perm) for the shape of a transposed x included),
    maybe with Unsqueeze/Squeeze/Cast around."""
    node = g.producer_of(tensor)
    while node is not None and node.op_type in ("Unsqueeze", "Cast", "Squeeze"):
        node = g.producer_of(node.input[0])
    if node is None:
        return None
    if node.op_type == "Shape":
        rank = len(g.shapes.get(node.input[0]) or ())
        start, end = attribute(node, "start", 0), attribute(node, "end", None)
        axes = list(range(rank))[start:end] if rank else []
        return (node.input[0], axes) if axes else None
    if node.op_type not in ("Gather", "Slice") or len(node.input) < 2:
        return None
    inner = shape_source(g, node.input[0])
    if inner is None:
        return None
    tensor, axes = inner
    if node.op_type == "Gather":
        index = g.constant(node.input[1])
        if index is None or index.ndim > 1 or not all(-len(axes) <= int(i) < len(axes) for i in index.reshape(-1)):
            return None
        return tensor, [axes[int(i)] for i in index.reshape(-1)]
    if len(node.input) >= 3:
        starts, ends = g.constant(node.input[1]), g.constant(node.input[2])
        if starts is None or ends is None or starts.size != 1 or ends.size != 1:
            return None
        picked = axes[int(starts.reshape(-1)[0]):int(ends.reshape(-1)[0])]
        return (tensor, picked) if picked else None
    return None


def head_layout(g: ModelGraph, reshape: onnx.NodeProto, width: int) -> tuple[int, int]:
    """(heads, head_dim) from a Reshape that splits `width` features into (…, H, d)."""
    entries = shape_entries(g, reshape.input[1])
    out_shape = g.shapes.get(reshape.output[0])
    heads = entries[-2] if entries and len(entries) >= 2 else None
    dim = entries[-1] if entries else None
    if (heads is None or heads <= 0) and out_shape and len(out_shape) >= 2:
        heads = out_shape[-2]
    if (dim is None or dim <= 0) and out_shape:
        dim = out_shape[-1]
    if dim and dim > 0 and not (heads and heads > 0):
        heads = width // dim
    if heads and heads > 0 and not (dim and dim > 0):
        dim = width // heads
    if not heads or not dim or heads * dim != width:
        raise NoMatch(f"cannot read heads × head dim from {reshape.name}")
    return int(heads), int(dim)
