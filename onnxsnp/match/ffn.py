"""FFN blocks: fc1 → element-wise activation → fc2, nothing else reading the hidden units."""
from __future__ import annotations

import numpy as np
import onnx

from dataclasses import dataclass, replace

from ..ir.graph import ModelGraph, attribute
from .blocks import Candidate, FfnBlock, Linear, NoMatch, ShapeEdit, Skipped, Width, block_name, common_scope
from .linear import bias_activation_fc1, linear_at, linear_producing
from .norms import norm_writing
from .size_arithmetic import width_function

# Element-wise ops of an FFN activation (GELU as Erf chain or op, ReLU, SiLU, tanh-GELU).
_ACTIVATION_OPS = {"Div", "Mul", "Add", "Sub", "Erf", "Gelu", "Relu", "Sigmoid", "Tanh", "Pow",
                   "Cast", "FastGelu", "BiasGelu", "QuickGelu", "HardSigmoid", "Softplus", "Identity",
                   "QuantizeLinear", "DequantizeLinear"}  # activation QDQ: per tensor (a per-channel one is refused)


def match_ffns(g: ModelGraph, taken: set[str]) -> tuple[list[FfnBlock], list[Skipped]]:
    blocks, skipped = [], []
    for node in g.nodes_of_type("MatMul", "Gemm"):
        fc2 = None if node.name in taken else linear_at(g, node)
        if fc2 is None:
            continue
        try:
            found = _ffn_before(g, fc2, taken)
        except NoMatch as why:
            if _looks_like_ffn(g, fc2):
                skipped.append(Skipped(node.name, Candidate.FFN, str(why)))
            continue
        if found is not None:
            blocks.append(found)
    # chained MLPs (A→act→B→act→C) match twice around B: prune neither rather than both
    uses: dict[str, int] = {}
    for block in blocks:
        for node in (block.fc1.node, block.fc2.node):
            uses[node] = uses.get(node, 0) + 1
    kept = [b for b in blocks if uses[b.fc1.node] == 1 and uses[b.fc2.node] == 1]
    skipped += [Skipped(b.fc2.node, Candidate.FFN, "shares a layer with another FFN (a chained MLP)")
                for b in blocks if b not in kept]
    return kept, skipped


def _looks_like_ffn(g: ModelGraph, fc2: Linear) -> bool:
    """Worth listing as a skipped FFN: an element-wise op (not a written-out norm) before it."""
    producer = g.producer_of(fc2.input)
    return producer is not None and producer.op_type in _ACTIVATION_OPS and norm_writing(g, fc2.input) is None


def _ffn_before(g: ModelGraph, fc2: Linear, taken: set[str]) -> FfnBlock | None:
    """fc1 → element-wise activation → fc2, where nothing else reads the hidden activations."""
    activation_nodes: dict[str, onnx.NodeProto] = {}
    frontier = [fc2.input]
    linears: dict[str, Linear] = {}  # by output: the two halves of one gate | up projection are two
    halves: dict[str, Half] = {}
    while frontier:
        tensor = frontier.pop()
        linear = linear_producing(g, tensor)
        if linear is not None:
            linears[linear.output] = linear
            continue
        node = g.producer_of(tensor)
        half = half_of_fused(g, node, tensor) if node is not None and node.op_type in ("Split", "Slice") else None
        if half is not None:
            linears[tensor], halves[tensor] = half.linear, half
            continue
        if node is None or node.op_type not in _ACTIVATION_OPS:
            return None
        if node.name in activation_nodes:
            continue
        activation_nodes[node.name] = node
        biased = bias_activation_fc1(g, node)
        if biased is not None:  # BiasGelu/FastGelu(x·W, b): fc1's bias lives in the activation
            linears[biased.node] = biased
            continue
        for inp in node.input:
            if not inp:
                continue
            value = g.constant(inp)
            if value is not None:
                if value.size != 1:
                    raise NoMatch(f"{node.name} applies a per-channel constant")
                continue
            frontier.append(inp)
    fc1, gate = _gated(g, list(linears.values()), activation_nodes)
    if fc1 is None or not activation_nodes or fc1.node in taken or gate is not None and gate.node in taken:
        return None
    columns, edits = (0, 0), ()
    if halves:
        if gate is None or set(halves) != {fc1.output, gate.output} or fc1.node != gate.node:
            raise NoMatch(f"{fc1.node}: one half of a projection's output feeds the FFN, the other does not gate it")
        columns = (halves[fc1.output].offset, halves[gate.output].offset)
        edits = tuple(dict.fromkeys(halves[fc1.output].edits + halves[gate.output].edits))
    if fc1.out_features != fc2.in_features or gate is not None and gate.out_features != fc1.out_features:
        raise NoMatch("fc1 and fc2 widths differ")
    inside = {fc1.output} | {o for n in activation_nodes.values() for o in n.output}
    if gate is not None:
        inside.add(gate.output)
    for tensor in inside:
        if tensor == fc2.input:  # besides fc2 only Shape reads may see it (a flattening reshape's width)
            if len([c for c in g.consumers_of(tensor) if c.op_type != "Shape"]) != 1:
                raise NoMatch("the hidden activation has other readers")
            continue
        for consumer in g.consumers.get(tensor, []):
            if consumer not in activation_nodes:
                raise NoMatch("the hidden activation has readers outside the FFN")
    ops = sorted({n.op_type for n in activation_nodes.values()})
    name = common_scope(fc1.node, fc2.node) or block_name(fc2.node, (fc1, fc2))
    return FfnBlock(name, fc1, fc2, "+".join(ops), gate, columns, edits)


@dataclass(frozen=True)
class Half:
    """One half of a gate | up projection's output (Phi-3's gate_up_proj, taken apart by a Split
    or two Slices along its features): the projection seen as that half's layer."""

    linear: Linear  # the projection, its output the half, out_features the half's width
    offset: int  # where the half's columns start in the weight
    edits: tuple[ShapeEdit, ...]  # the split's sizes or the slice bounds that hold the half's width


def half_of_fused(g: ModelGraph, node: onnx.NodeProto, tensor: str) -> Half | None:
    """The half of a projection's output that `node` (a Split in two, or one of two Slices along
    the features) makes `tensor`; None where `node` reads no projection; NoMatch where it takes
    it apart in another way."""
    whole = linear_producing(g, node.input[0])
    rank = len(g.shapes.get(node.input[0]) or ())
    if whole is None:
        return None
    readers = g.consumers_of(whole.output)
    width = whole.out_features // 2
    if not rank or whole.out_features % 2 or whole.out_reshape is not None:
        raise NoMatch(f"{node.name} takes apart {whole.output}, not two halves of one rank-known projection")
    if node.op_type == "Split":
        if len(readers) != 1:
            raise NoMatch(f"{whole.output} is read by {', '.join(r.name for r in readers)}: not only the gate | up split")
        sizes = g.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if len(node.output) != 2 or attribute(node, "axis", 0) not in (-1, rank - 1) or \
                sizes is not None and [int(v) for v in sizes.reshape(-1)] != [width, width]:
            raise NoMatch(f"{node.name} does not split {whole.output} into two halves along its features")
        index = list(node.output).index(tensor)
        edits = () if sizes is None else (ShapeEdit(node.name, Width.FFN, -2), ShapeEdit(node.name, Width.FFN, -1))
        return Half(replace(whole, output=tensor, out_features=width), index * width, edits)
    slices = [r for r in readers if r.op_type == "Slice"]
    shapes = [r for r in readers if r.op_type == "Shape"]
    if len(slices) != 2 or len(slices) + len(shapes) != len(readers):
        raise NoMatch(f"{whole.output} is read by {', '.join(r.name for r in readers)}: not only the gate | up split")
    bounds = [_feature_bounds(g, r, rank, whole.out_features) for r in slices]
    if set(bounds) == {(0, width), (width, whole.out_features)} and not shapes:
        start, _ = bounds[slices.index(node)]
        edit = ShapeEdit(node.name, Width.FFN, -1, 2 if start == 0 else 1)  # the first half's end, the second's start
        return Half(replace(whole, output=tensor, out_features=width), start, (edit,))
    start = _halves_at_run_time(g, slices, shapes, whole, rank).get(node.name)
    if start is None:
        raise NoMatch(f"{', '.join(r.name for r in slices)} do not slice {whole.output} into two halves along its features")
    return Half(replace(whole, output=tensor, out_features=width), start * width, ())


def _halves_at_run_time(g: ModelGraph, slices: list[onnx.NodeProto], shapes: list[onnx.NodeProto], whole: Linear,
                        rank: int) -> dict[str, int]:
    """{slice: 0 or 1}: which half each Slice takes where their bounds are computed at run time from
    the projection's width (the legacy exporter's `chunk`): checked at the width it has and at
    smaller even ones, so that they follow a cut by themselves. {} where they do not."""
    functions, used = [], set()
    for node in slices:
        if _feature_bounds(g, node, rank, 1, constant=False) is None:
            return {}
        pair = []
        for t in node.input[1:3]:
            value = g.constant(t)
            found = None if value is not None else width_function(g, t, whole.output)
            if value is None and found is None:
                return {}
            pair.append((lambda _, v=value: v) if found is None else found[0])
            used |= set() if found is None else found[1]
        functions.append(pair)
    if any(c.name not in used for s in shapes for c in g.consumers_of(s.output[0])):
        return {}  # the width is read for something else too
    taken: dict[str, int] = {}
    for total in (whole.out_features, whole.out_features - 2, 2):
        half = total // 2
        for node, (starts, ends) in zip(slices, functions):
            bound = (int(np.asarray(starts(total)).reshape(-1)[0]), min(int(np.asarray(ends(total)).reshape(-1)[0]), total))
            index = {(0, half): 0, (half, total): 1}.get(bound)
            if index is None or taken.setdefault(node.name, index) != index:
                return {}
    return taken if sorted(taken.values()) == [0, 1] else {}


def _feature_bounds(g: ModelGraph, node: onnx.NodeProto, rank: int, total: int, constant: bool = True
                    ) -> tuple[int, int] | tuple[()] | None:
    """[start, end) of a Slice along the last axis with constant bounds and step 1; else None.
    With `constant` False only the axis and step are checked (an empty tuple where they hold)."""
    starts, ends, axes, steps = (g.constant(node.input[i]) if len(node.input) > i and node.input[i] else None
                                 for i in range(1, 5))
    if axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) not in (-1, rank - 1) or \
            steps is not None and int(steps.reshape(-1)[0]) != 1:
        return None
    if not constant:
        return ()
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    return int(starts.reshape(-1)[0]), min(int(ends.reshape(-1)[0]), total)


_NONLINEAR = {"Sigmoid", "Erf", "Gelu", "Tanh", "Relu", "FastGelu", "BiasGelu", "QuickGelu", "HardSigmoid", "Softplus",
              "Pow", "Div"}


def _gated(g: ModelGraph, linears: list[Linear], activation: dict[str, onnx.NodeProto]
           ) -> tuple[Linear | None, Linear | None]:
    """(fc1, gate): one projection, or two joined by a product where only the gate's output goes
    through a non-linearity first (SwiGLU: silu(x·W_gate) ∘ x·W_up; GeGLU: gelu(x·W_gate) ∘ x·W_up,
    GELU maybe written out with x·x·x and tanh). The gate is read by a non-linear op or more than
    once (x·σ(x), x·x); the up projection only by the product."""
    if len(linears) <= 1:
        return (linears[0] if linears else None), None
    if len(linears) > 2:
        raise NoMatch("the activation mixes more than two projections")
    nonlinear = []
    for linear in linears:
        readers = [c for c in g.consumers_of(linear.output) if c.name in activation]
        reads = sum(list(c.input).count(linear.output) for c in readers)
        nonlinear.append(reads > 1 or any(c.op_type in _NONLINEAR for c in readers))
    if sum(nonlinear) != 1:
        raise NoMatch("the activation mixes two projections")
    gate, fc1 = (linears[0], linears[1]) if nonlinear[0] else (linears[1], linears[0])
    readers = g.consumers_of(fc1.output)
    if len(readers) != 1 or readers[0].op_type != "Mul":
        raise NoMatch("the activation mixes two projections")
    return fc1, gate
