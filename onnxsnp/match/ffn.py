"""FFN blocks: fc1 → element-wise activation → fc2, nothing else reading the hidden units."""
from __future__ import annotations

import onnx

from ..ir.graph import ModelGraph
from .blocks import Candidate, FfnBlock, Linear, NoMatch, Skipped, block_name, common_scope
from .linear import bias_activation_fc1, linear_at, linear_producing
from .norms import norm_writing

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
    linears: dict[str, Linear] = {}
    while frontier:
        tensor = frontier.pop()
        linear = linear_producing(g, tensor)
        if linear is not None:
            linears[linear.node] = linear
            continue
        node = g.producer_of(tensor)
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
    return FfnBlock(name, fc1, fc2, "+".join(ops), gate)


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
