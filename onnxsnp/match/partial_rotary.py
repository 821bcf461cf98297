"""A partial rotary embedding (StableLM, Phi-1.5/Phi-2, GPT-NeoX, Phi-4-mini): only the first r of
each head's d dims are rotated, the rest passed through, q = Concat(rotary(q[..., :r]), q[..., r:]).

The whole construct is one `Rotary` whose input is q and output the Concat (`rotated` = r): the
rotated dims pair up as (i, i + r/2) and keep their table columns, the passed-through dims are
free. Both Slice bounds at r and the inner rotate_half split r/2 are literals the cut edits
(Width.QK_ROTATED, QK_ROTATED_HALF), and they are one for all heads: so every head keeps the same
dims (the block's `pairs_shared`), whose rotated part is the kept dims below r.
"""
from __future__ import annotations

from dataclasses import replace

from ..ir.graph import ModelGraph, attribute
from .blocks import NoMatch, Rotary, RotaryStyle, ShapeEdit, Width
from .decoder import _BIG, _bounds, rotary_producing

SHARED = "a partial rotary embedding splits every head at one point: every head keeps the same dims"


def partial_rotary_producing(g: ModelGraph, tensor: str) -> tuple[Rotary, list[ShapeEdit], int | None] | None:
    """(the embedding, the literal split points to edit, half the rotated width where it is a
    literal) where `tensor` is
    Concat(rotary(x[..., :r]), x[..., r:]) along the last axis; None where it is no such Concat.
    NoMatch where it is one but cannot be cut (a split point computed at run time, an odd part)."""
    node = g.producer_of(tensor)
    if node is None or node.op_type != "Concat" or len(node.input) != 2:
        return None
    rank = len(g.shapes.get(tensor) or ())
    if not rank or attribute(node, "axis") not in (-1, rank - 1):
        return None
    found = rotary_producing(g, node.input[0])
    low, high = g.producer_of(node.input[1]), None
    if found is None or low is None or low.op_type != "Slice":
        return None
    rotary, edits, half = found
    high = g.producer_of(rotary.input)
    if high is None or high.op_type != "Slice" or high.input[0] != low.input[0]:
        return None
    first, rest = _bounds(g, high, rank), _bounds(g, low, rank)
    if first is None or rest is None:
        return None
    (start, split), (again, end) = first, rest
    if start != 0 or split is None or again != split or (end is not None and end < _BIG):
        raise NoMatch(f"{node.name}: a partial rotary embedding whose split point is not a literal")
    width = g.dim(tensor, -1)
    # rotate_half's split: a literal r/2 (torch's dynamo exporter) or computed from the rotated part's
    # shape at run time (the legacy exporter), which then follows the cut by itself
    if rotary.style is not RotaryStyle.HALF or half is not None and 2 * half != split:
        raise NoMatch(f"{node.name}: a partial rotary embedding that does not rotate half of its {split} dims")
    if isinstance(width, int) and (width - split) % 2:
        raise NoMatch(f"{node.name} passes {width - split} dims through: an odd count (they are cut in pairs)")
    edits = [replace(e, width=Width.QK_ROTATED_HALF) for e in edits]
    edits += [ShapeEdit(high.name, Width.QK_ROTATED, -1, 2), ShapeEdit(low.name, Width.QK_ROTATED, -1, 1)]
    nodes = (node.name, high.name, low.name) + rotary.nodes
    whole = replace(rotary, node=node.name, input=high.input[0], output=tensor, nodes=nodes, rotated=split)
    return whole, edits, half
