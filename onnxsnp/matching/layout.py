"""Axis tracing: which entry of a shape holds a head width or the head count, followed through
Reshape, Transpose, Squeeze and Unsqueeze, and where shape tensors read their entries from."""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..graph import ModelGraph, attribute
from .blocks import AttentionBlock, NoMatch, ShapeEdit


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
    node = g.producer_of(shape)
    pieces = node.input if node is not None and node.op_type == "Concat" else [shape]
    entries: list[Entry] = []
    for piece in pieces:
        value = g.constant(piece)
        if value is not None:
            entries += [Entry(int(x)) for x in value.reshape(-1)]
            continue
        source = shape_source(g, piece)
        if source is None:
            return None
        tensor, axes = source
        entries += [Entry(g.dim(tensor, axis), tensor in region) for axis in axes]
    return entries


def shape_entries(g: ModelGraph, shape: str) -> list[int | None] | None:
    entries = read_entries(g, shape)
    return None if entries is None else [e.value for e in entries]


def shape_source(g: ModelGraph, tensor: str) -> tuple[str, list[int]] | None:
    """(T, axes) if `tensor` holds dims `axes` of T, read through Shape and Gather/Slice
    (maybe with Unsqueeze/Squeeze/Cast around)."""
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
    shape = g.producer_of(node.input[0]) if node.input else None
    if shape is None or shape.op_type != "Shape":
        return None
    inner = shape_source(g, node.input[0])
    if inner is None:
        return None
    tensor, axes = inner
    if node.op_type == "Gather":
        index = g.constant(node.input[1])
        if index is None or index.size != 1 or not -len(axes) <= int(index.reshape(-1)[0]) < len(axes):
            return None
        return tensor, [axes[int(index.reshape(-1)[0])]]
    if node.op_type == "Slice" and len(node.input) >= 3:
        starts, ends = g.constant(node.input[1]), g.constant(node.input[2])
        if starts is None or ends is None or starts.size != 1 or ends.size != 1:
            return None
        picked = axes[int(starts.reshape(-1)[0]):int(ends.reshape(-1)[0])]
        return (tensor, picked) if picked else None
    return None


def _check_trailing(g: ModelGraph, reshape: onnx.NodeProto, entries: list[Entry], position: int) -> None:
    """The dims after the tracked axis must pass through a Reshape unchanged, else the axis moved."""
    if position == -1:
        return
    before = (g.shapes.get(reshape.input[0]) or ())[len(g.shapes.get(reshape.input[0]) or ()) + position + 1:]
    after = entries[position + 1:]
    if len(before) != len(after):
        raise NoMatch(f"{reshape.name} changes the dims after the head dim")
    for dim, entry in zip(before, after):
        if not entry.follows and (dim is None or entry.value != dim):
            raise NoMatch(f"{reshape.name} may move the head dim")


def path_shape_edits(g: ModelGraph, forward: list[onnx.NodeProto], kind: str, block: AttentionBlock,
                      region: set[str], split: bool) -> list[ShapeEdit]:
    """Follow the head-dim axis (and the heads axis) along a pruned path and list the Reshape
    entries that hold them.

    `split` says whether the path starts with heads split (…, H, N, d) or merged (…, H·d); axes
    are tracked as positions from the end through Transpose and Reshape, so an entry is edited
    because it holds the head dim, not because its value happens to equal d. Where the heads
    axis cannot be followed, whole-head pruning is marked impossible for the block."""
    d, merged = block.head_dim, block.heads * block.head_dim
    position = -1
    heads_at: int | None = -3 if split else None
    edits = []
    for node in forward:
        if node.op_type == "Transpose":
            perm = list(attribute(node, "perm", []))
            if not perm:
                raise NoMatch(f"{node.name} has no perm")
            position = perm.index(len(perm) + position) - len(perm)
            if heads_at is not None and len(perm) >= -heads_at:
                heads_at = perm.index(len(perm) + heads_at) - len(perm)
        elif node.op_type in ("Squeeze", "Unsqueeze"):
            out_rank = len(g.shapes.get(node.output[0]) or ())
            in_rank = len(g.shapes.get(node.input[0]) or ())
            if not out_rank or not in_rank:
                raise NoMatch(f"rank unknown around {node.name}")
            # only leading axes may come or go: the tracked axes keep their place from the end
            if max(-position, -(heads_at or -1)) > min(out_rank, in_rank):
                raise NoMatch(f"{node.name} squeezes an axis next to the head dim")
        elif node.op_type == "Reshape":
            entries = read_entries(g, node.input[1], region)
            if entries is None or len(entries) < -position:
                raise NoMatch(f"cannot read the target shape of {node.name}")
            entry = entries[position]
            _check_trailing(g, node, entries, position)
            if not split:
                if entry.value == merged or entry.follows:
                    if entry.value == merged and not entry.follows:
                        edits.append(ShapeEdit(node.name, kind + "_merged", position))
                    continue
                if position != -1 or len(entries) < 2:
                    raise NoMatch(f"{node.name} reshapes the merged heads in an unknown way")
                heads = entries[-2]
                if entry.value not in (d, -1) or heads.value not in (block.heads, -1) and not heads.follows:
                    raise NoMatch(f"{node.name} does not split into (…, {block.heads}, {d})")
                split, heads_at = True, -2
                if entry.value == d:
                    edits.append(ShapeEdit(node.name, kind, -1))
                if heads.value == block.heads and not heads.follows:
                    edits.append(ShapeEdit(node.name, "heads", -2))
                continue
            in_rank = len(g.shapes.get(node.input[0]) or ())
            if position == -1 and heads_at == -2 and in_rank == len(entries) + 1 and \
                    (entry.follows or entry.value in (merged, -1)):
                split, heads_at = False, None  # (…, H, d) merged back into (…, H·d), h·d + j order
                if entry.value == merged and not entry.follows:
                    edits.append(ShapeEdit(node.name, kind + "_merged", -1))
                continue
            edits += _heads_entry(node, entries, heads_at, block)
            heads_at = _heads_after(node, entries, heads_at, position, block)
            if entry.follows or entry.value == -1:
                continue
            if entry.value == d:
                edits.append(ShapeEdit(node.name, kind, position))
            else:
                raise NoMatch(f"cannot tell which entry of {node.name}'s target shape holds the head dim")
        elif node.op_type not in ("Mul", "Div", "Identity", "Cast"):
            raise NoMatch(f"{node.op_type} node {node.name} on a pruned path")
    return edits


def _heads_entry(node: onnx.NodeProto, entries: list[Entry], heads_at: int | None,
                 block: AttentionBlock) -> list[ShapeEdit]:
    """The edit for the heads entry of a Reshape that keeps heads split, if it is a literal H."""
    if heads_at is None or len(entries) < -heads_at:
        return []
    entry = entries[heads_at]
    if not entry.follows and entry.value == block.heads:
        return [ShapeEdit(node.name, "heads", heads_at)]
    return []


def _heads_after(node: onnx.NodeProto, entries: list[Entry], heads_at: int | None,
                 position: int, block: AttentionBlock) -> int | None:
    """Where the heads axis is after a Reshape that keeps the head dim; None once it is lost
    (merged with another axis), which rules out removing whole heads in this block."""
    if heads_at is not None and len(entries) >= -heads_at:
        entry = entries[heads_at]
        if entry.follows or entry.value in (block.heads, -1):
            return heads_at
    literal = [e for i, e in enumerate(entries) if i - len(entries) != position and not e.follows and e.value not in (-1, 0)]
    if any(e.value == block.heads for e in literal) or heads_at is not None:
        block.heads_fixed = block.heads_fixed or f"{node.name} reshapes the heads axis in a way onnxsnp cannot follow"
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
