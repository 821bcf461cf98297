"""Match stage, residual stream: every tensor that carries the stream and every layer that
reads or writes it, so that the same channels can be removed everywhere at once.

The stream is found by spreading from the transformer blocks' inputs and outputs: producers
and consumers of a stream tensor must be understood (residual Adds, LayerNormalization, the
projections that read it or write it, token selection, the class-token Concat, the position
embedding Add, the patch-embedding Conv, embedding-table lookups). Anything else that touches the stream stops residual
pruning with the reason — a half-pruned stream is never written.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import onnx

from ..ir.graph import ModelGraph, attribute
from . import Linear, Matches, NoMatch, ShapeEdit, Width, linear_at, linear_producing
from .groups import Group, WeightAxis, group, reads, writes
from .norms import norm_reading, norm_writing

_SKIP_NORMS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")

_TOKEN_OPS = {"Gather", "Slice", "ReduceMean", "Identity", "Squeeze", "Unsqueeze"}


@dataclass(frozen=True)
class ResidualStream:
    width: int
    tensors: frozenset[str]  # last axis = residual channel
    readers: tuple[Linear, ...]  # keep input rows
    writers: tuple[Linear, ...]  # keep output columns and bias
    sliced_inputs: frozenset[tuple[str, int]]  # (node, input): constants cut on the last axis
    convs: frozenset[str]  # patch-embedding Conv nodes: output channels
    channel_entries: frozenset[str]  # Reshapes whose entry -2 is the channel count


@dataclass(frozen=True)
class _Step:
    """What classifying one writer or reader of a stream tensor found: further stream tensors to
    visit and the parts to cut (`find_stream` gathers them into a ResidualStream)."""

    tensors: tuple[str, ...] = ()
    readers: tuple[Linear, ...] = ()
    writers: tuple[Linear, ...] = ()
    sliced_inputs: tuple[tuple[str, int], ...] = ()
    convs: tuple[str, ...] = ()
    channel_entries: tuple[str, ...] = ()

    def __add__(self, other: _Step) -> _Step:
        return _Step(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def stream_group(g: ModelGraph, stream: ResidualStream) -> Group:
    """The residual channels as a dependency group: every reader's input rows, every writer's
    output columns, the constants cut on their last axis, the patch Conv's filters and the
    Reshape entries that hold the width."""
    parts: list = [WeightAxis(node, index, -1) for node, index in sorted(stream.sliced_inputs)]
    for linear in stream.readers:
        parts += reads(linear, Width.CHANNELS)
    for linear in stream.writers:
        parts += writes(linear, 0, Width.CHANNELS)
    for name in sorted(stream.convs):
        conv = g.node(name)
        parts += [WeightAxis(name, index, 0) for index in (1, 2) if len(conv.input) > index and conv.input[index]]
    parts += [ShapeEdit(name, Width.CHANNELS, -2) for name in sorted(stream.channel_entries)]
    return group("residual", stream.width, parts)


def find_stream(g: ModelGraph, matches: Matches) -> ResidualStream:
    """The residual stream of `matches.layers`; NoMatch says why it cannot be pruned."""
    if not matches.layers:
        raise NoMatch("no transformer blocks on a residual stream were found")
    if any(block.causal for block in matches.attention):
        # measured, docs/DECODER_GUIDE.md: 10 % of SmolLM2-135M's stream cost 1,200x its perplexity
        raise NoMatch("this is a decoder, and cutting 10 % of a real decoder's stream "
                      "channels (SmolLM2-135M) multiplied its perplexity by 1,200; prune heads and FFN "
                      "neurons instead (--ratio, --target-flops)")
    width = matches.layers[0].attention.q.in_features
    queue = [t for layer in matches.layers for t in (layer.input, layer.output)]
    edited = {e.reshape for b in matches.attention for e in b.shape_edits if e.width.endswith("_merged")}
    outputs = set(g.graph_outputs)
    tensors: set[str] = set()
    readers: dict[str, Linear] = {}  # by node, in the order found: a layer found twice is kept once
    writers: dict[str, Linear] = {}
    found = _Step()  # the constants, convs and entries to cut
    while queue:
        tensor = queue.pop()
        if tensor in tensors:
            continue
        if tensor in outputs:
            raise NoMatch(f"the residual stream is a model output ({tensor}): its width must not change")
        tensors.add(tensor)
        for step in [_producer(g, tensor, width)] + [_consumer(g, r, tensor, width, edited)
                                                     for r in g.consumers_of(tensor)]:
            queue += step.tensors
            readers.update((r.node, r) for r in step.readers)
            writers.update((w.node, w) for w in step.writers)
            found += replace(step, tensors=(), readers=(), writers=())
    return ResidualStream(width, frozenset(tensors), tuple(readers.values()), tuple(writers.values()),
                          frozenset(found.sliced_inputs), frozenset(found.convs), frozenset(found.channel_entries))


def _producer(g: ModelGraph, tensor: str, width: int) -> _Step:
    """Classify what writes a stream tensor of `width` channels."""
    linear = linear_producing(g, tensor)
    if linear is not None:
        if linear.out_features != width:
            raise NoMatch(f"{linear.node} writes {linear.out_features} features into a {width}-wide stream")
        return _Step(writers=(linear,))
    norm = norm_writing(g, tensor)
    if norm is not None:
        return _Step((norm.input,), sliced_inputs=tuple(norm.channel_inputs))  # γ and β: one entry per channel
    node = g.producer_of(tensor)
    if node is None:
        raise NoMatch(f"the residual stream comes straight from the model input {tensor}")
    if node.op_type in ("Add", "Mul"):  # residual joins, position embedding, LayerScale
        return _elementwise_inputs(g, node, width)
    if node.op_type in _SKIP_NORMS:
        return _skip_norm(g, node)
    if node.op_type == "Concat" and attribute(node, "axis") in (1, -2):
        found, sliced = [], []
        for index, part in enumerate(node.input):
            source = g.producer_of(part)
            if source is not None and source.op_type == "Expand" and g.is_constant(source.input[0]):
                sliced.append((source.name, 0))  # the class token, broadcast over the batch
            elif g.is_constant(part):
                sliced.append((node.name, index))
            else:
                found.append(part)
        return _Step(tuple(found), sliced_inputs=tuple(sliced))
    if node.op_type == "Gather" and g.is_constant(node.input[0]) and attribute(node, "axis", 0) == 0:
        table = g.constant(node.input[0])
        if table.ndim != 2 or table.shape[1] != width:
            raise NoMatch(f"{node.name} looks up a table that is not {width} wide")
        return _Step(sliced_inputs=((node.name, 0),))  # token / position / segment embedding table
    if node.op_type in _TOKEN_OPS:
        return _Step((node.input[0],))
    if node.op_type == "Transpose" and list(attribute(node, "perm", [])) == [0, 2, 1]:
        return _patch_embedding(g, node, width)
    raise NoMatch(f"{node.op_type} node {node.name} writes the residual stream")


def _consumer(g: ModelGraph, node: onnx.NodeProto, tensor: str, width: int, edited: set[str]) -> _Step:
    """Classify a reader of a stream tensor of `width` channels."""
    if node.op_type in ("MatMul", "Gemm", "FusedMatMul") and node.input[0] == tensor:
        linear = linear_at(g, node)
        if linear is None or linear.in_features != width:
            raise NoMatch(f"{node.name} reads the residual stream but is not a projection with constant weights")
        return _Step(readers=(linear,))
    if node.op_type == "Reshape":  # tokens flattened for 2-D products: every reader must be one
        readers = [linear_at(g, c) if c.op_type in ("MatMul", "Gemm", "FusedMatMul") else None
                   for c in g.consumers_of(node.output[0])]
        if not readers or any(r is None or r.input != tensor or r.in_features != width for r in readers):
            raise NoMatch(f"Reshape node {node.name} reads the residual stream")
        return _Step(readers=tuple(readers))
    norm = norm_reading(g, tensor, node)
    if norm is not None:
        return _Step((norm.output,), sliced_inputs=tuple(norm.channel_inputs))  # γ and β: one entry per channel
    if node.op_type in ("Add", "Mul"):
        return _Step((node.output[0],)) + _elementwise_inputs(g, node, width)
    if node.op_type in _SKIP_NORMS:
        return _Step(tuple(t for t in node.output if t)) + _skip_norm(g, node)
    if node.op_type in _TOKEN_OPS and node.input[0] == tensor:
        _token_axis_only(g, node, tensor)
        return _Step((node.output[0],))
    if node.op_type == "Concat" and attribute(node, "axis") in (1, -2):
        return _Step((node.output[0],))
    if node.op_type == "Shape":
        _shape_reads_ok(g, node, tensor, edited)
        return _Step()
    raise NoMatch(f"{node.op_type} node {node.name} reads the residual stream")


def _elementwise_inputs(g: ModelGraph, node: onnx.NodeProto, width: int) -> _Step:
    found, sliced = [], []
    for index, part in enumerate(node.input):
        value = g.constant(part)
        if value is None:
            found.append(part)
        elif value.ndim and value.shape[-1] == width:
            sliced.append((node.name, index))  # e.g. the position embedding
        elif value.size != 1:
            raise NoMatch(f"{node.name} adds a constant that does not follow the channels")
    return _Step(tuple(found), sliced_inputs=tuple(sliced))


def _skip_norm(g: ModelGraph, node: onnx.NodeProto) -> _Step:
    """SkipLayerNormalization(x, skip, γ, β, bias): adds and normalises; both outputs it writes
    (0: normalised, 3: the sum) carry the stream."""
    sliced = []
    for index in range(2, len(node.input)):
        if node.input[index]:
            if not g.is_constant(node.input[index]):
                raise NoMatch(f"{node.name} has a run-time scale or bias")
            sliced.append((node.name, index))
    if any(node.output[1:3]):
        raise NoMatch(f"{node.name} writes the mean or variance of the residual stream")
    return _Step(tuple(node.input[:2]), sliced_inputs=tuple(sliced))


def _token_axis_only(g: ModelGraph, node: onnx.NodeProto, tensor: str) -> None:
    """Token selection or pooling must leave the channel axis alone."""
    rank = len(g.shapes.get(tensor) or ())
    if node.op_type == "Gather" and attribute(node, "axis", 0) in (1, -2):
        return
    if node.op_type == "ReduceMean":
        axes = attribute(node, "axes", None)
        if axes is None and len(node.input) > 1:
            value = g.constant(node.input[1])
            axes = None if value is None else [int(a) for a in value.reshape(-1)]
        if axes and all(a % max(rank, 1) != rank - 1 for a in axes):
            return
    if node.op_type == "Slice" and len(node.input) > 3:
        axes = g.constant(node.input[3])
        if axes is not None and all(int(a) % max(rank, 1) != rank - 1 for a in axes.reshape(-1)):
            return
    if node.op_type == "Identity":
        return
    raise NoMatch(f"{node.op_type} node {node.name} may change the residual channels")


def _shape_reads_ok(g: ModelGraph, node: onnx.NodeProto, tensor: str, edited: set[str]) -> None:
    """Shape(stream) is fine for batch and token dims; the channel dim may only feed attention
    merge reshapes, whose entry onnxsnp rewrites to a constant anyway."""
    rank = len(g.shapes.get(tensor) or ())
    for reader in g.consumers_of(node.output[0]):
        index = g.constant(reader.input[1]) if reader.op_type == "Gather" and len(reader.input) > 1 else None
        if index is not None and index.size == 1 and int(index.reshape(-1)[0]) % max(rank, 1) != rank - 1:
            continue
        if index is not None and _feeds_only(g, reader.output[0], edited):
            continue  # rewriting pins every attention merge width to a constant when the stream is cut
        if reader.op_type == "Slice":  # Shape → Slice(0, k): leading dims only
            ends = g.constant(reader.input[2]) if len(reader.input) > 2 else None
            if ends is not None and ends.size == 1 and 0 < int(ends.reshape(-1)[0]) < rank:
                continue
        raise NoMatch(f"{reader.name} reads the residual width at run time")


def _feeds_only(g: ModelGraph, tensor: str, reshapes: set[str]) -> bool:
    """Does `tensor` reach nothing but the shape input of the given Reshapes?"""
    frontier = [tensor]
    while frontier:
        current = frontier.pop()
        for reader in g.consumers_of(current):
            if reader.op_type == "Reshape" and reader.input[1] == current:
                if reader.name not in reshapes:
                    return False
            elif reader.op_type in ("Unsqueeze", "Concat", "Cast"):
                frontier += list(reader.output)
            else:
                return False
    return True


def _patch_embedding(g: ModelGraph, transpose: onnx.NodeProto, width: int) -> _Step:
    """Conv (B, C, h, w) → Reshape/Flatten (B, C, h·w) → Transpose (B, h·w, C)."""
    flat = g.producer_of(transpose.input[0])
    if flat is None or flat.op_type not in ("Reshape", "Flatten"):
        raise NoMatch(f"{transpose.name} writes the residual stream from an unknown source")
    conv = g.producer_of(flat.input[0])
    if conv is None or conv.op_type != "Conv" or not g.is_constant(conv.input[1]) or attribute(conv, "group", 1) != 1:
        raise NoMatch(f"{flat.name} writes the residual stream from something other than a patch Conv")
    if len(g.consumers_of(conv.output[0])) != 1 and not all(
            c.op_type == "Shape" for c in g.consumers_of(conv.output[0]) if c.name != flat.name):
        raise NoMatch(f"{conv.name}'s output has other readers")
    if g.constant(conv.input[1]).shape[0] != width:
        raise NoMatch(f"{conv.name} has {g.constant(conv.input[1]).shape[0]} output channels")
    entries: tuple[str, ...] = ()
    if flat.op_type == "Reshape":
        shape = g.constant(flat.input[1])
        if shape is not None:
            if shape.size != 3 or int(shape[1]) not in (width, 0):
                raise NoMatch(f"{flat.name} does not reshape to (B, C, h·w)")
            if int(shape[1]) == width:
                entries = (flat.name,)
    return _Step(convs=(conv.name,), channel_entries=entries)
