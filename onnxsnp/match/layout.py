"""Axis tracing along a pruned path: where the head dim, the heads axis and (for a fused
projection) the q/k/v axis are after every Reshape, Transpose, Squeeze, Unsqueeze and
Split/Slice/Gather, in whatever order an exporter or optimizer left them, and which Reshape
entries hold a width that pruning changes.

Axes are counted from the end, so ops that add, drop or regroup leading (batch, token) axes
leave them in place; an entry is edited because it holds the head dim, not because its value
happens to equal d.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import onnx

from ..ir.graph import ModelGraph, attribute
from .blocks import AttentionBlock, NoMatch, Part, ShapeEdit, Width
from .shapes import Entry, read_entries

# element-wise: every axis stays where it is (activation QDQ is checked per tensor when traced)
_PASS = ("Mul", "Div", "Identity", "Cast", "QuantizeLinear", "DequantizeLinear")
_SELECTORS = ("Split", "Slice", "Gather")


@dataclass(frozen=True)
class Axes:
    """Where the tracked axes of a tensor are, counted from the end."""

    merged: bool  # heads × head dim in one axis, at `dim`
    dim: int = -1  # the head dim (or the merged axis)
    heads: int | None = None  # the heads axis; None where it is merged or lost
    part: int | None = None  # a fused projection's q/k/v axis, until a selector takes one part
    repeat: int | None = None  # grouped-query attention: the axis repeating each key/value head, until merged


@dataclass(frozen=True)
class Path:
    """Which widths the entries along a path hold: q's, k's and v's (key/value heads: fewer with
    grouped-query attention, until they are repeated for the query heads) or the merged output's."""

    dim: Width  # the per-head width
    merged: Width  # heads × per-head width
    heads: Width  # the heads count
    count: int  # heads along the path

    @classmethod
    def of(cls, part: Part, block: AttentionBlock) -> "Path":
        """q, k and v from the projections, OUT from attn·V to the output projection."""
        groups = block.groups
        return {Part.QUERY: cls(Width.QK, Width.QK_MERGED, Width.HEADS, block.heads),
                Part.KEY: cls(Width.QK, Width.KV_QK_MERGED, Width.KV_HEADS, groups),
                Part.VALUE: cls(Width.V, Width.KV_V_MERGED, Width.KV_HEADS, groups),
                Part.OUT: cls(Width.V, Width.V_MERGED, Width.HEADS, block.heads)}[part]

    def repeated(self, block: AttentionBlock) -> "Path":
        """After the key/value heads are repeated for the query heads."""
        merged = Width.QK_MERGED if self.dim is Width.QK else Width.V_MERGED
        return Path(self.dim, merged, Width.HEADS, block.heads)


MERGED = Axes(True)  # (…, H·d): a projection's output
SPLIT = Axes(False, -1, -3)  # (…, H, N, d): an attention op's 4-D input
FUSED = Axes(False, -1, -2, -3)  # (…, 3, H, d): a fused projection after its head split


def path_shape_edits(g: ModelGraph, forward: list[onnx.NodeProto], kind: Path, block: AttentionBlock,
                     region: set[str], start: Axes, lost: list[str], seen: dict[str, Axes] | None = None,
                     passes: frozenset[str] = frozenset()) -> list[ShapeEdit]:
    """Follow the tracked axes from `start` along `forward` and list the Reshape entries that hold
    a pruned width; `seen` gets the axes of every tensor on the way (and of each node's first
    input, as `seen[node name]`). `passes`: nodes known to keep every axis where it is (a rotary
    embedding's Add, a KV cache's Concat). Where the heads axis cannot be followed, `lost` gets the
    reason (whole heads cannot be removed in the block: its `heads_fixed`)."""
    axes, edits = start, []
    for node in forward:
        if seen is not None:
            seen[node.name] = axes
        if node.name in passes:
            pass
        elif node.op_type == "Transpose":
            axes = _transposed(node, axes)
        elif node.op_type in ("Squeeze", "Unsqueeze"):
            axes = _squeezed(g, node, axes)
        elif node.op_type in _SELECTORS:
            axes = _selected(g, node, axes)
        elif node.op_type == "Expand":
            axes = _expanded(g, node, axes, kind, region, edits)
        elif node.op_type == "Reshape":
            if axes.part is not None:
                raise NoMatch(f"{node.name} reshapes the fused projection before q, k and v are taken apart")
            if axes.repeat is not None:
                axes, kind = _repeat_merged(g, node, axes, kind, block, region, edits)
            else:
                axes = _reshaped(g, node, axes, kind, block, region, edits, lost)
        elif node.op_type not in _PASS:
            raise NoMatch(f"{node.op_type} node {node.name} on a pruned path")
        if seen is not None:
            seen.update((t, axes) for t in node.output)
    return edits


def _expanded(g: ModelGraph, node: onnx.NodeProto, axes: Axes, kind: Path, region: set[str],
              edits: list[ShapeEdit]) -> Axes:
    """Expand may only broadcast axes the cut leaves alone — in grouped-query attention, the size-1
    axis after the key/value heads, to the number of query heads per group (marked as `repeat`)."""
    entries = read_entries(g, node.input[1], region)
    rank = len(g.shapes.get(node.input[0]) or ())
    if entries is None or not rank or len(entries) != rank or axes.merged or axes.heads is None:
        raise NoMatch(f"cannot read how {node.name} expands a pruned tensor")
    dim, heads = entries[axes.dim], entries[axes.heads]
    for entry, width, count in ((dim, kind.dim, None), (heads, kind.heads, kind.count)):
        if entry.follows or entry.value == 1:
            continue
        if count is not None and entry.value == count:
            edits.append(ShapeEdit(node.name, width, axes.heads))
        elif count is None and entry.value == g.dim(node.input[0], axes.dim):
            edits.append(ShapeEdit(node.name, width, axes.dim))
        else:
            raise NoMatch(f"{node.name} expands the head dim or the heads axis")
    after = axes.heads + 1
    if after < 0 and after != axes.dim and g.dim(node.input[0], after) == 1 and not entries[after].follows \
            and (entries[after].value or 1) > 1:
        return replace(axes, repeat=after)
    return axes


def _repeat_merged(g: ModelGraph, node: onnx.NodeProto, axes: Axes, kind: Path, block: AttentionBlock,
                   region: set[str], edits: list[ShapeEdit]) -> tuple[Axes, Path]:
    """The Reshape merging key/value heads with their repeats into query heads (…, H, N, d)."""
    entries = read_entries(g, node.input[1], region)
    if entries is None or axes.repeat != axes.heads + 1 or axes.dim != -1:
        raise NoMatch(f"{node.name} does not merge the repeated key/value heads")
    rank_in = len(g.shapes.get(node.input[0]) or ())
    if len(entries) != rank_in - 1:
        raise NoMatch(f"{node.name} does not merge the repeated key/value heads")
    after = kind.repeated(block)
    heads_at = axes.heads + 1  # the repeat axis goes: the axes after it keep their places from the end
    heads, dim = entries[heads_at], entries[-1]
    if not heads.follows and heads.value not in (-1, 0):
        if heads.value != block.heads:
            raise NoMatch(f"{node.name} merges into {heads.value} heads, not {block.heads}")
        edits.append(ShapeEdit(node.name, after.heads, heads_at))
    if not dim.follows and dim.value not in (-1, 0):
        if dim.value != g.dim(node.input[0], -1):
            raise NoMatch(f"cannot tell which entry of {node.name}'s target shape holds the head dim")
        edits.append(ShapeEdit(node.name, after.dim, -1))
    return Axes(False, -1, heads_at), after


def _moved(axes: Axes, where) -> Axes:
    """`axes` with each tracked position p replaced by where(p)."""
    return replace(axes, dim=where(axes.dim), heads=None if axes.heads is None else where(axes.heads),
                   part=None if axes.part is None else where(axes.part))


def _transposed(node: onnx.NodeProto, axes: Axes) -> Axes:
    perm = list(attribute(node, "perm", []))
    if not perm:
        raise NoMatch(f"{node.name} has no perm")
    n = len(perm)
    return _moved(axes, lambda p: perm.index(n + p) - n if -n <= p else p)


def _rank(g: ModelGraph, tensor: str, node: onnx.NodeProto) -> int:
    rank = len(g.shapes.get(tensor) or ())
    if not rank:
        raise NoMatch(f"rank unknown around {node.name}")
    return rank


def _axes_input(g: ModelGraph, node: onnx.NodeProto) -> list[int] | None:
    """The `axes` of Squeeze/Unsqueeze/Slice: an input from opset 13 on, an attribute before."""
    index = 3 if node.op_type == "Slice" else 1
    if len(node.input) > index and node.input[index]:
        value = g.constant(node.input[index])
        return None if value is None else [int(a) for a in value.reshape(-1)]
    value = attribute(node, "axes", None)
    return None if value is None else list(value)


def _squeezed(g: ModelGraph, node: onnx.NodeProto, axes: Axes) -> Axes:
    in_rank, out_rank = _rank(g, node.input[0], node), _rank(g, node.output[0], node)
    listed = _axes_input(g, node)
    if node.op_type == "Unsqueeze":
        if listed is None:
            raise NoMatch(f"{node.name} has no axes")
        inserted = {a % out_rank for a in listed}
        kept = [j for j in range(out_rank) if j not in inserted]
        return _moved(axes, lambda p: kept[in_rank + p] - out_rank)
    if listed is None:  # every size-1 axis goes
        listed = [i for i, dim in enumerate(g.shapes.get(node.input[0]) or ()) if dim == 1]
        if len(listed) != in_rank - out_rank:
            raise NoMatch(f"{node.name} squeezes axes onnxsnp cannot tell")
    removed = {a % in_rank for a in listed}
    if axes.part is not None and in_rank + axes.part in removed:
        axes = replace(axes, part=None)
    if any(in_rank + p in removed for p in (axes.dim, axes.heads) if p is not None):
        raise NoMatch(f"{node.name} squeezes the head dim or the heads axis")
    return _moved(axes, lambda p: p + sum(1 for r in removed if r > in_rank + p))


def _selected(g: ModelGraph, node: onnx.NodeProto, axes: Axes) -> Axes:
    """Split/Slice/Gather may only take one part of a fused projection along its q/k/v axis."""
    rank = _rank(g, node.input[0], node)
    if node.op_type == "Slice":
        listed = _axes_input(g, node)
        starts = g.constant(node.input[1]) if len(node.input) > 1 else None
        axis = listed[0] if listed is not None and len(listed) == 1 else \
            0 if listed is None and starts is not None and starts.size == 1 else None
    else:
        axis = attribute(node, "axis", 0)
    if axes.part is None or axis is None or axis % rank != rank + axes.part:
        raise NoMatch(f"{node.op_type} node {node.name} on a pruned path")
    index = g.constant(node.input[1]) if node.op_type == "Gather" else None
    if index is None or index.ndim:
        return axes  # the q/k/v axis stays, of size 1
    part = axes.part  # a scalar Gather drops it: the axes before it move one closer to the end
    return replace(_moved(axes, lambda p: p + 1 if p < part else p), part=None)


def _reshaped(g: ModelGraph, node: onnx.NodeProto, axes: Axes, kind: Path, block: AttentionBlock,
              region: set[str], edits: list[ShapeEdit], lost: list[str]) -> Axes:
    d, merged = block.head_dim, kind.count * block.head_dim
    position = axes.dim
    entries = read_entries(g, node.input[1], region)
    if entries is None or len(entries) < -position:
        raise NoMatch(f"cannot read the target shape of {node.name}")
    entry = entries[position]
    _check_trailing(g, node, entries, position)
    if axes.merged:
        single = kind.count == 1 and len(entries) > len(g.shapes.get(node.input[0]) or ())  # (…, d) → (…, 1, d)
        if (entry.value == merged or entry.follows) and not single:
            if entry.value == merged and not entry.follows:
                edits.append(ShapeEdit(node.name, kind.merged, position))
            return axes
        if position != -1 or len(entries) < 2:
            raise NoMatch(f"{node.name} reshapes the merged heads in an unknown way")
        heads = entries[-2]
        if entry.value not in (d, -1) or heads.value not in (kind.count, -1) and not heads.follows:
            raise NoMatch(f"{node.name} does not split into (…, {kind.count}, {d})")
        if entry.value == d:
            edits.append(ShapeEdit(node.name, kind.dim, -1))
        if heads.value == kind.count and not heads.follows:
            edits.append(ShapeEdit(node.name, kind.heads, -2))
        return Axes(False, -1, -2)
    if _merges_heads(g, node, entries, axes, merged):  # (…, H, d) back into (…, H·d), h·d + j order
        if entry.value == merged and not entry.follows:
            edits.append(ShapeEdit(node.name, kind.merged, -1))
        return MERGED
    edits += _heads_entry(node, entries, axes.heads, kind)
    heads_at = _heads_after(node, entries, axes.heads, position, kind, lost)
    if entry.value == d and not entry.follows:
        edits.append(ShapeEdit(node.name, kind.dim, position))
    elif not entry.follows and entry.value != -1:
        raise NoMatch(f"cannot tell which entry of {node.name}'s target shape holds the head dim")
    return replace(axes, heads=heads_at)


def _merges_heads(g: ModelGraph, node: onnx.NodeProto, entries: list[Entry], axes: Axes, merged: int) -> bool:
    """Does this Reshape merge the last two axes (H, d) into one (maybe flattening leading axes too)?"""
    entry = entries[-1]
    if axes.dim != -1 or axes.heads != -2 or not (entry.follows or entry.value in (merged, -1)):
        return False
    in_rank = len(g.shapes.get(node.input[0]) or ())
    return in_rank == len(entries) + 1 or entry.value == merged or g.dim(node.output[0], -1) == merged


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


def _heads_entry(node: onnx.NodeProto, entries: list[Entry], heads_at: int | None, kind: Path) -> list[ShapeEdit]:
    """The edit for the heads entry of a Reshape that keeps heads split, if it is a literal H."""
    if heads_at is None or len(entries) < -heads_at:
        return []
    entry = entries[heads_at]
    if not entry.follows and entry.value == kind.count:
        return [ShapeEdit(node.name, kind.heads, heads_at)]
    return []


def _heads_after(node: onnx.NodeProto, entries: list[Entry], heads_at: int | None,
                 position: int, kind: Path, lost: list[str]) -> int | None:
    """Where the heads axis is after a Reshape that keeps the head dim; None once it is lost
    (merged with another axis), which rules out removing whole heads in this block (`lost` says why)."""
    if heads_at is not None and len(entries) >= -heads_at:
        entry = entries[heads_at]
        if entry.follows or entry.value in (kind.count, -1):
            return heads_at
    literal = [e for i, e in enumerate(entries) if i - len(entries) != position and not e.follows and e.value not in (-1, 0)]
    if any(e.value == kind.count for e in literal) or heads_at is not None:
        lost.append(f"{node.name} reshapes the heads axis in a way onnxsnp cannot follow")
    return None
