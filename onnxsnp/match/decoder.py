"""What decoders add on the way from a projection to the scores: a rotary position embedding
written out op by op (x·cos + rotate(x)·sin), the KV cache (past keys or values, a graph input,
joined with this step's along the sequence axis into the present ones, a graph output) and the
repetition of key/value heads for grouped-query attention (Unsqueeze → Expand → Reshape).

A rotary embedding rotates pairs of head dims — (i, i + d/2) after rotate_half (its halves taken
by two Slices or, as onnxruntime's session optimizer saves it, one Split), (2i, 2i + 1) when
interleaved — by the same angle, so both dims of a pair are kept or removed together and
the cos/sin tables are sliced to the kept dims (rewriting.py). Where the split point d/2 is a
literal in the graph it becomes a shape edit of the Q/K group. The ONNX RotaryEmbedding op
(opset 23: torch's dynamo exporter at opset 23; `onnx_rotary_op`) and onnxruntime's
com.microsoft.RotaryEmbedding (its transformers optimizer; `ort_rotary_op`) do the same in one
node, with caches that hold one column per pair for all heads alike.
"""
from __future__ import annotations

import onnx

from ..ir.graph import ModelGraph, attribute
from .blocks import KvCache, NoMatch, Part, Rotary, RotaryStyle, ShapeEdit, Width
from .shapes import read_entries

_BIG = 2 ** 31  # a Slice end at or past this means "to the end"


def rotary_producing(g: ModelGraph, tensor: str) -> tuple[Rotary, list[ShapeEdit], int | None] | None:
    """The written-out rotary embedding whose output is `tensor`: (it, the literal split points to
    edit, the split point where it is a literal), or None where `tensor` is no rotary output."""
    node = g.producer_of(tensor)
    if node is None or node.op_type != "Add" or len(node.input) != 2:
        return None
    muls = [g.producer_of(t) for t in node.input]
    if any(m is None or m.op_type != "Mul" for m in muls):
        return None
    for cos_mul, sin_mul in (muls, muls[::-1]):
        for index in (0, 1):
            found = _rotated(g, sin_mul.input[index])
            if found is None:
                continue
            x, style, inner, edits, half = found
            if cos_mul.input[0] == cos_mul.input[1]:
                continue
            plain, casts = _same_cast(g, x, cos_mul)
            if plain is None:
                continue
            tables = ((cos_mul.name, 1 - list(cos_mul.input).index(plain)), (sin_mul.name, 1 - index))
            nodes = (node.name, cos_mul.name, sin_mul.name) + tuple(inner) + casts
            source = x if not casts else plain if len(casts) == 1 else g.node(casts[0]).input[0]
            return Rotary(style, node.name, source, tensor, tables, nodes), edits, half
    return None


def _same_cast(g: ModelGraph, x: str, cos_mul: onnx.NodeProto) -> tuple[str | None, tuple[str, ...]]:
    """(cos_mul's input that is `x`, ()) — or, where the legacy exporter casts the rotated tensor
    again for rotate_half (ModernBERT's `q.float()`), (its input that `x` casts, the Cast), or
    (its input that is an equal Cast of what `x` casts, the two Casts); (None, ()) where none."""
    if x in cos_mul.input:
        return x, ()
    first = g.producer_of(x)
    if first is None or first.op_type != "Cast":
        return None, ()
    if first.input[0] in cos_mul.input:  # rotate_half(x.float()) beside x·cos, x already float
        return first.input[0], (first.name,)
    for t in cos_mul.input:
        other = g.producer_of(t)
        if other is not None and other.op_type == "Cast" and other.input[0] == first.input[0] and \
                attribute(other, "to") == attribute(first, "to"):
            return t, (first.name, other.name)
    return None, ()


def onnx_rotary_op(g: ModelGraph, node: onnx.NodeProto) -> Rotary:
    """The ONNX RotaryEmbedding op (opset 23) on a head-split (…, H, N, d) q or k, its cos/sin caches
    (…, N, d/2) given per token (computed from the positions at run time): one column per pair,
    broadcast over the heads, so every head must keep the same pairs (the caches are gathered to
    them). NoMatch where the op indexes its caches itself (position_ids), rotates only part of the
    head, or takes merged heads."""
    inputs = list(node.input) + [""] * (4 - len(node.input))
    if inputs[3]:
        raise NoMatch(f"{node.name}: RotaryEmbedding reads position_ids {inputs[3]} "
                      "(caches indexed inside the op are not supported)")
    if attribute(node, "rotary_embedding_dim", 0):
        raise NoMatch(f"{node.name}: RotaryEmbedding rotates part of the head (rotary_embedding_dim)")
    rank = len(g.shapes.get(inputs[0]) or ())
    if rank != 4:
        raise NoMatch(f"{node.name}: RotaryEmbedding input {inputs[0]} is not (batch, heads, tokens, head dim)"
                      f"{' (rank unknown)' if not rank else f' but rank {rank}'}")
    style = RotaryStyle.INTERLEAVED if attribute(node, "interleaved", 0) else RotaryStyle.HALF
    return Rotary(style, node.name, inputs[0], node.output[0], ((node.name, 1), (node.name, 2)), (node.name,),
                  shared=True, per_token=True)


def ort_rotary_op(g: ModelGraph, node: onnx.NodeProto, tensor: str) -> Rotary | None:
    """com.microsoft.RotaryEmbedding(x, position_ids, cos_cache, sin_cache) producing `tensor`, as
    onnxruntime's transformers optimizer fuses a written-out rotation: its caches hold one column
    per pair (positions × d/2) for every head, as GroupQueryAttention's do, so they are gathered to
    the kept pairs and every head keeps the same pairs. None for any other node; NoMatch where the
    op rotates part of the head or reads heads merged (3-D x, whose head count is an attribute)."""
    if node.op_type != "RotaryEmbedding" or node.domain != "com.microsoft" or len(node.input) < 4:
        return None
    if attribute(node, "rotary_embedding_dim", 0):
        raise NoMatch(f"{node.name} rotates {attribute(node, 'rotary_embedding_dim', 0)} dims of each head "
                      "(partial rotary embeddings are not supported)")
    if len(g.shapes.get(node.input[0]) or ()) != 4:
        raise NoMatch(f"{node.name} reads q/k with the heads merged or of unknown rank: not supported")
    if any(g.constant(t) is None for t in node.input[2:4]):
        raise NoMatch(f"{node.name}'s cos/sin caches are not constants")
    style = RotaryStyle.INTERLEAVED if attribute(node, "interleaved", 0) else RotaryStyle.HALF
    return Rotary(style, node.name, node.input[0], tensor, ((node.name, 2), (node.name, 3)), (node.name,), shared=True)


def _negated_and_plain(g: ModelGraph, negated: str, plain: str) -> tuple | None:
    """(Neg, the Slice it negates, the other Slice) where `negated` is −Slice(x) and `plain` Slice(x)."""
    neg, second = g.producer_of(negated), g.producer_of(plain)
    if neg is None or second is None or neg.op_type != "Neg" or second.op_type != "Slice":
        return None
    first = g.producer_of(neg.input[0])
    if first is None or first.op_type != "Slice" or first.input[0] != second.input[0]:
        return None
    return neg, first, second


def _split_halves(g: ModelGraph, concat: onnx.NodeProto) -> tuple | None:
    """rotate_half with its two Slices made one Split (onnxruntime's GatherSliceToSplitFusion, at
    the session's extended level): Concat(−Split(x)[1], Split(x)[0]) along the last axis. (x,
    nodes, edits, split point): the sizes input, where given, holds d/2 twice and follows the cut;
    without one the Split halves x itself. None where `concat` is no such rotation; NoMatch, with
    the reason, where it is one the rewrite cannot follow."""
    neg, plain = g.producer_of(concat.input[0]), g.producer_of(concat.input[1])
    if neg is None or neg.op_type != "Neg" or plain is None or plain.op_type != "Split" or len(plain.output) != 2:
        return None
    if g.producer_of(neg.input[0]) is not plain or list(plain.output) != [concat.input[1], neg.input[0]]:
        return None
    x = plain.input[0]
    rank = len(g.shapes.get(x) or ())
    if not rank or attribute(concat, "axis") not in (-1, rank - 1) or attribute(plain, "axis", 0) not in (-1, rank - 1):
        return None
    if attribute(plain, "split", None) is not None:
        raise NoMatch(f"{plain.name} holds rotate_half's split sizes in an attribute (opset < 13), "
                      "which the rewrite does not edit")
    edits, half = [], None
    if len(plain.input) > 1 and plain.input[1]:
        sizes = g.constant(plain.input[1])
        if sizes is None:
            raise NoMatch(f"{plain.name} splits q/k at run-time sizes {plain.input[1]}")
        if sizes.size != 2 or sizes.reshape(-1)[0] != sizes.reshape(-1)[1]:
            raise NoMatch(f"{plain.name} splits q/k into {sizes.reshape(-1).tolist()}: rotate_half takes two "
                          "equal halves")
        half = int(sizes.reshape(-1)[0])
        edits = [ShapeEdit(plain.name, Width.QK_HALF, position, 1) for position in (-2, -1)]
    return x, [concat.name, neg.name, plain.name], edits, half


def _rotated(g: ModelGraph, tensor: str) -> tuple[str, RotaryStyle, list[str], list[ShapeEdit], int | None] | None:
    """(x, style, nodes, edits, split point) if `tensor` is rotate_half(x) or its interleaved form."""
    node = g.producer_of(tensor)
    if node is None:
        return None
    if node.op_type == "Concat" and len(node.input) == 2:  # rotate_half: [−x[d/2:], x[:d/2]]
        split = _split_halves(g, node)
        if split is not None:
            x, nodes, edits, half = split
            return x, RotaryStyle.HALF, nodes, edits, half
        halves = _negated_and_plain(g, *node.input)
        if halves is None:
            return None
        negated, first, second = halves
        x = first.input[0]
        rank = len(g.shapes.get(x) or ())
        if not rank or attribute(node, "axis") not in (-1, rank - 1):
            return None
        high, low = _bounds(g, first, rank), _bounds(g, second, rank)
        if high is None or low is None:
            return None
        (start_high, end_high), (start_low, end_low) = high, low
        if start_low != 0 or (end_high is not None and end_high < _BIG) or start_high != end_low:
            return None
        edits = [ShapeEdit(name, Width.QK_HALF, -1, index) for name, index, value in
                 ((first.name, 1, start_high), (second.name, 2, end_low)) if value is not None]
        return x, RotaryStyle.HALF, [node.name, negated.name, first.name, second.name], edits, start_high
    if node.op_type == "Reshape":  # interleaved: stack((−x[1::2], x[0::2]), −1) flattened
        concat = g.producer_of(node.input[0])
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
            return None
        pieces = [g.producer_of(t) for t in concat.input]
        if any(p is None or p.op_type != "Unsqueeze" for p in pieces):
            return None
        halves = _negated_and_plain(g, *(p.input[0] for p in pieces))
        if halves is None:
            return None
        negated, first, second = halves
        x = first.input[0]
        rank = len(g.shapes.get(x) or ())
        odd, even = _bounds(g, first, rank, step=2), _bounds(g, second, rank, step=2)
        if odd is None or even is None or odd[0] != 1 or even[0] != 0:
            return None
        entries = read_entries(g, node.input[1])
        if entries is None or len(entries) != rank:
            return None
        edits = []
        last = entries[-1]
        if not last.follows and last.value not in (-1,):
            edits.append(ShapeEdit(node.name, Width.QK, -1))
        for at, entry in enumerate(entries[:-1]):
            if entry.follows or entry.value in (None, 0, -1):  # None: read at run time from a batch or sequence
                continue
            # a literal head count on (…, H, N, d) (Cohere's export); the tracer makes it the
            # key/value heads on k
            if at == rank - 3 and g.dim(x, at) == entry.value:
                edits.append(ShapeEdit(node.name, Width.HEADS, at - rank))
                continue
            return None  # a literal sequence entry: leave it to a form that needs it
        nodes = [node.name, concat.name, *(p.name for p in pieces), negated.name, first.name, second.name]
        return x, RotaryStyle.INTERLEAVED, nodes, edits, None
    return None


def _bounds(g: ModelGraph, node: onnx.NodeProto, rank: int, step: int = 1) -> tuple[int | None, int | None] | None:
    """(start, end) of a Slice over the last axis with `step` (None where a bound is computed at run
    time, which rotate_half exports do from the shape of x); None for anything else."""
    inputs = list(node.input) + [""] * (5 - len(node.input))
    axes = g.constant(inputs[3]) if inputs[3] else None
    steps = g.constant(inputs[4]) if inputs[4] else None
    if axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) not in (-1, rank - 1):
        return None
    if (1 if steps is None else int(steps.reshape(-1)[0])) != step or (steps is not None and steps.size != 1):
        return None
    values = []
    for tensor in inputs[1:3]:
        value = g.constant(tensor)
        if value is not None and value.size != 1:
            return None
        values.append(None if value is None else int(value.reshape(-1)[0]))
    return values[0], values[1]


def kv_cache_join(g: ModelGraph, node: onnx.NodeProto, tensor: str, part: Part) -> tuple[KvCache, str] | None:
    """(the cache, this step's tensor) if `node` is Concat(past, new) producing `tensor`, past a
    graph input; None otherwise. The past may come through a Cast (an fp16 model with float32
    inputs and outputs: onnxruntime's convert_float_to_float16(keep_io_types=True)) or a Slice
    along the joined axis (a sliding-window cache keeps its last positions), and the present may
    go out through such ops: the cache is still the graph's input and output."""
    if node.op_type != "Concat" or len(node.input) != 2:
        return None
    graph_inputs = {i.name for i in g.model.graph.input} - set(g.initializers)
    past = [_cache_end(g, t, graph_inputs, backward=True) for t in node.input]
    if sum(p is not None for p in past) != 1:
        return None
    at = 0 if past[0] is not None else 1
    (name, into), out = past[at], _cache_end(g, tensor, set(g.graph_outputs), backward=False)
    present, out_of = out if out is not None else ("", ())
    # the slices may cut only the joined (sequence) axis; the rank is the declared past's
    rank = len(g.shapes.get(tensor) or g.shapes.get(name) or ())
    axis = attribute(node, "axis", 0) % rank if rank else None
    if not all(_slices_only(g, g.node(n), axis, rank) for n in into):
        return None
    if not all(_slices_only(g, g.node(n), axis, rank) for n in out_of):
        present, out_of = "", ()
    return KvCache(name, present, part, through=into + out_of), node.input[1 - at]


def _cache_end(g: ModelGraph, tensor: str, ends: set[str], backward: bool) -> tuple[str, tuple[str, ...]] | None:
    """The graph input (`backward`) or output that `tensor` is, directly or through up to two Casts
    and Slices; with the nodes passed. None if it is none."""
    passed: list[str] = []
    for _ in range(3):
        if tensor in ends:
            return tensor, tuple(passed)
        if backward:
            node = g.producer_of(tensor)
            nodes = [node] if node is not None and node.op_type in ("Cast", "Slice") else []
        else:
            nodes = [c for c in g.consumers_of(tensor) if c.op_type in ("Cast", "Slice")
                     and _leads_to(g, c.output[0], ends)]
        if len(nodes) != 1:
            return None
        passed.append(nodes[0].name)
        tensor = nodes[0].input[0] if backward else nodes[0].output[0]
    return None


def _leads_to(g: ModelGraph, tensor: str, ends: set[str]) -> bool:
    """Is `tensor` one of `ends`, or read by a Cast or Slice writing one?"""
    return tensor in ends or any(c.op_type in ("Cast", "Slice") and c.output[0] in ends for c in g.consumers_of(tensor))


def _slices_only(g: ModelGraph, node: onnx.NodeProto, axis: int | None, rank: int) -> bool:
    """Is `node` a Cast, or a Slice cutting only along `axis` (the cache's joined one)?"""
    if node.op_type == "Cast":
        return True
    axes = g.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    return axis is not None and axes is not None and {int(a) % rank for a in axes.reshape(-1)} == {axis}


def check_kv_axis(node: onnx.NodeProto, rank: int, tracked: tuple[int | None, ...]) -> None:
    """A KV cache joins along the sequence axis: never one the cut changes."""
    axis = attribute(node, "axis", 0)
    if axis is None or (axis % rank) - rank in {t for t in tracked if t is not None}:
        raise NoMatch(f"{node.name} joins the cache along the head or head-dim axis")
