"""Normalisations over the channel axis of the residual stream, as one op (LayerNormalization,
SimplifiedLayerNormalization / RMSNormalization) or written out by an exporter (ReduceMean, Sub,
Pow, Add ε, Sqrt, Div or Reciprocal·Mul, then Mul γ and Add β), and the channel-wise scales
that follow a sub-block (LayerScale: Mul by a learned vector). Residual pruning cuts their γ, β
and scale vectors with the channels; transformer blocks are joined across them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..ir.graph import ModelGraph, attribute

_NORM_OPS = {"LayerNormalization": (1, 2), "SimplifiedLayerNormalization": (1,), "RMSNormalization": (1,)}
_WRITTEN_OUT = {"ReduceMean", "Sub", "Pow", "Add", "Sqrt", "Div", "Mul", "Reciprocal", "Cast"}


@dataclass(frozen=True)
class Norm:
    input: str  # the tensor normalised, over its last axis
    output: str
    nodes: frozenset[str]
    channel_inputs: tuple[tuple[str, int], ...]  # (node, input) of γ and β: one entry per channel


def norm_reading(g: ModelGraph, tensor: str, reader: onnx.NodeProto) -> Norm | None:
    """The norm of `tensor` that `reader` (a consumer of it) belongs to, if any."""
    if reader.op_type in _NORM_OPS:
        return _op_norm(g, reader) if reader.input[0] == tensor else None
    return _written_out(g, tensor) if reader.op_type in _WRITTEN_OUT else None


def norm_writing(g: ModelGraph, tensor: str) -> Norm | None:
    """The norm whose output is `tensor`, if any."""
    node = g.producer_of(tensor)
    if node is None:
        return None
    if node.op_type in _NORM_OPS:
        return _op_norm(g, node) if node.output[0] == tensor else None
    norms = [norm for norm in map(lambda x: _written_out(g, x), _sources(g, node)) if norm and norm.output == tensor]
    # x − mean(x) normalised by its RMS is a norm too: the whole LayerNorm is the largest
    return max(norms, key=lambda norm: len(norm.nodes), default=None)


def normalized(g: ModelGraph, stream: str) -> str | None:
    """The output of the one norm that reads `stream`, if exactly one does."""
    outputs = {norm.output for reader in g.consumers_of(stream) if (norm := norm_reading(g, stream, reader))}
    return outputs.pop() if len(outputs) == 1 else None


def branch_norm(g: ModelGraph, branch: str) -> Norm | None:
    """The norm a sub-block's output goes through before its residual Add (x + LN(f(x)): Gemma 3's
    post-norms, OLMo 2's only norms), maybe after a Cast to the norm's compute type."""
    readers = g.consumers_of(branch)
    if len(readers) == 1 and readers[0].op_type == "Cast":
        branch, readers = readers[0].output[0], g.consumers_of(readers[0].output[0])
    norms = {norm.output: norm for reader in readers if (norm := norm_reading(g, branch, reader))}
    return next(iter(norms.values())) if len(norms) == 1 else None


def rms_gain(g: ModelGraph, norm: Norm) -> tuple[np.ndarray, float] | None:
    """(γ, ε) of an RMS norm, y = γ·x / √(mean(x²) + ε); None for one that centres x or adds β."""
    nodes = [g.node(name) for name in norm.nodes]
    if any(n.op_type in ("Sub", "LayerNormalization") for n in nodes) or len(norm.channel_inputs) > 1:
        return None
    gamma = np.ones(1, np.float32)
    for name, index in norm.channel_inputs:
        gamma = g.constant(g.node(name).input[index]).reshape(-1).astype(np.float32)
    if len(nodes) == 1:  # SimplifiedLayerNormalization / RMSNormalization
        return gamma, float(attribute(nodes[0], "epsilon", 1e-5))
    small = [float(v) for n in nodes if n.op_type == "Add" for t in n.input
             if (v := g.constant(t)) is not None and v.size == 1 and 0 < float(v) < 1e-2]
    return (gamma, small[0]) if len(small) == 1 else None


def channel_scale(g: ModelGraph, node: onnx.NodeProto, data: str) -> int | None:
    """The input index of the constant vector (or scalar) a Mul scales `data` by, per channel —
    LayerScale — or None if `node` is not such a Mul."""
    if node.op_type != "Mul" or len(node.input) != 2 or data not in node.input:
        return None
    index = 1 - list(node.input).index(data)
    value = g.constant(node.input[index])
    return index if value is not None and (value.size == 1 or value.ndim >= 1 and value.size == value.shape[-1]) \
        else None


def _op_norm(g: ModelGraph, node: onnx.NodeProto) -> Norm | None:
    rank = len(g.shapes.get(node.input[0]) or ())
    if attribute(node, "axis", -1) not in (-1, rank - 1) or rank == 0 and attribute(node, "axis", -1) != -1:
        return None
    inputs = tuple((node.name, i) for i in _NORM_OPS[node.op_type] if len(node.input) > i and node.input[i])
    if any(not g.is_constant(g.node(n).input[i]) for n, i in inputs):
        return None
    return Norm(node.input[0], node.output[0], frozenset({node.name}), inputs)


def _sources(g: ModelGraph, node: onnx.NodeProto) -> list[str]:
    """Tensors a written-out norm ending at `node` may start from: walk back to a ReduceMean."""
    seen, frontier, found = set(), [node], []
    while frontier:
        current = frontier.pop()
        if current.name in seen or current.op_type not in _WRITTEN_OUT or len(seen) > 16:
            continue
        seen.add(current.name)
        if current.op_type == "ReduceMean":
            found.append(current.input[0])
            squared = g.producer_of(current.input[0])  # an RMS norm averages x², not x
            if squared is not None and _squares(g, squared) is not None:
                found.append(_squares(g, squared))
        frontier += [p for p in map(g.producer_of, current.input) if p is not None]
    return found


def _written_out(g: ModelGraph, x: str) -> Norm | None:
    """The norm written out from `x`: every node whose inputs are `x`, constants or tensors of the
    norm, grown from the statistics over the last axis; exactly one tensor may leave it, and only
    its last Mul (γ) and Add (β) may apply per-channel constants."""
    rank = len(g.shapes.get(x) or ())
    seeds = [n for n in g.consumers_of(x) if n.op_type == "ReduceMean" and _last_axis_only(g, n, rank)]
    seeds += [n for n in g.consumers_of(x) if _squares(g, n) == x and any(
        r.op_type == "ReduceMean" and _last_axis_only(g, r, rank) for r in g.consumers_of(n.output[0]))]
    if not seeds:
        return None
    nodes: dict[str, onnx.NodeProto] = {n.name: n for n in seeds}
    tensors = {n.output[0] for n in seeds}
    grown = True
    while grown:
        grown = False
        for tensor in list(tensors) + [x]:
            for node in g.consumers_of(tensor):
                if node.name in nodes or node.op_type not in _WRITTEN_OUT:
                    continue
                inputs = [t for t in node.input if t]
                if all(t == x or t in tensors or g.is_constant(t) for t in inputs) and any(t in tensors for t in inputs):
                    nodes[node.name] = node
                    tensors.update(node.output)
                    grown = True
    leaving = {t for t in tensors if t in g.graph_outputs or any(c.name not in nodes for c in g.consumers_of(t))}
    if len(leaving) != 1:
        return None
    output = leaving.pop()
    channel_inputs = _affine(g, nodes, output, rank)
    if channel_inputs is None:
        return None
    return Norm(x, output, frozenset(nodes), channel_inputs)


def _squares(g: ModelGraph, node: onnx.NodeProto) -> str | None:
    """y if `node` is Pow(y, 2) or Mul(y, y)."""
    if node.op_type == "Pow" and g.constant(node.input[1]) is not None and float(g.constant(node.input[1])) == 2.0:
        return node.input[0]
    if node.op_type == "Mul" and node.input[0] == node.input[1]:
        return node.input[0]
    return None


def _last_axis_only(g: ModelGraph, node: onnx.NodeProto, rank: int) -> bool:
    axes = attribute(node, "axes", None)
    if axes is None and len(node.input) > 1:
        value = g.constant(node.input[1])
        axes = None if value is None else [int(a) for a in value.reshape(-1)]
    return axes is not None and len(axes) == 1 and axes[0] in (-1, rank - 1)


def _affine(g: ModelGraph, nodes: dict[str, onnx.NodeProto], output: str, rank: int) -> tuple | None:
    """(node, input) of the γ/β vectors at the end of the norm; None if a per-channel constant sits
    anywhere else (then this is not a norm onnxsnp understands)."""
    tail: list[tuple[str, int]] = []
    node = g.producer_of(output)
    while node is not None and node.op_type == "Cast":  # back to the model's type after γ (OLMo 2)
        node = g.producer_of(node.input[0])
    while node is not None and node.op_type in ("Add", "Mul") and len(tail) < 2:
        vectors = [i for i, t in enumerate(node.input) if g.is_constant(t) and g.constant(t).size > 1]
        if not vectors:
            break
        tail.append((node.name, vectors[0]))
        node = g.producer_of(next(t for t in node.input if not g.is_constant(t)))
    for name, node in nodes.items():
        for index, tensor in enumerate(node.input):
            value = g.constant(tensor) if tensor else None
            if value is not None and value.size > 1 and (name, index) not in tail and node.op_type != "ReduceMean":
                return None
    return tuple(tail)
