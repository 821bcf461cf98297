"""A cost model: the MACs and parameters a plan would have, predicted without rewriting it.

The original model's per-node MACs (from one onnxruntime run's shapes) and initializer sizes
scale linearly with the kept fractions of the widths a node's weights carry, so any plan — and
the cost of one unit of any group — is costed in microseconds, and exactly for the nodes it
counts (MatMul, Gemm, Conv; the report's numbers are measured on the written model).
"""
from __future__ import annotations

import networkx as nx
import numpy as np

from .graph import ModelGraph
from .matching import Layer, Linear, Matches
from .plan import AttentionKeep, PrunePlan


class CostModel:
    """Predicted MACs per sample and parameters of a plan."""

    def __init__(self, g: ModelGraph, matches: Matches, macs: dict[str, int], params: int):
        self.g, self.matches, self.node_macs, self.params_total = g, matches, macs, params
        self.macs_total = sum(macs.values())
        self.layer_nodes = {id(layer): self._nodes_of(layer) for layer in matches.layers}
        self.readers: dict[str, set[str]] = {}  # float initializer → nodes reading it (through Identity)
        for node in g.model.graph.node:
            if node.op_type == "Identity":
                continue
            for tensor in node.input:
                source = g.initializer_behind(tensor) if tensor else None
                if source is not None and g.initializers[source].data_type in (1, 10, 11, 16):
                    self.readers.setdefault(source, set()).add(node.name)

    def cost(self, plan: PrunePlan, kind: str) -> float:
        return self.flops(plan) if kind == "flops" else self.params(plan)

    def flops(self, plan: PrunePlan) -> float:
        scale = {name: 1.0 for name in self.node_macs}
        for keep in plan.attention:  # the attention products
            f_qk, f_v = _fractions(keep)
            scores, context = keep.block.core_nodes
            if scores == context:  # one op computes both products
                scale[scores] = (f_qk + f_v) / 2
            else:
                scale[scores], scale[context] = f_qk, f_v
        for name, (inputs, outputs, _) in self._linear_fractions(plan).items():
            scale[name] = inputs * outputs
        if plan.stream is not None:
            for name in plan.stream.convs:
                scale[name] = len(plan.stream_keep) / plan.stream.width
        for name in self._removed(plan):
            scale[name] = 0.0
        return sum(self.node_macs[name] * factor for name, factor in scale.items() if name in self.node_macs) * 2

    def params(self, plan: PrunePlan) -> float:
        removed = self._removed(plan)
        saved = 0.0
        for name, (inputs, outputs, linear) in self._linear_fractions(plan).items():
            if name in removed:
                continue
            weight = int(np.prod(self.g.constant(linear.weight).shape))
            saved += weight * (1 - inputs * outputs)
            if linear.bias is not None:
                saved += self.g.constant(linear.bias).size * (1 - outputs)
        for keep in plan.attention:
            if keep.block.packed_bias is not None:  # MultiHeadAttention's [q | k | v] bias
                f_qk, f_v = _fractions(keep)
                saved += self.g.constant(keep.block.packed_bias).size * (1 - (2 * f_qk + f_v) / 3)
        if plan.stream is not None:
            cut = 1 - len(plan.stream_keep) / plan.stream.width
            constants = {self.g.initializer_behind(self.g.node(n).input[i]) for n, i in plan.stream.sliced_inputs}
            constants |= {self.g.initializer_behind(t) for n in plan.stream.convs for t in self.g.node(n).input[1:3] if t}
            saved += sum(int(np.prod(self.g.initializers[c].dims)) * cut for c in constants - {None}
                         if not self.readers.get(c, set()) <= removed)
        for name, readers in self.readers.items():  # weights only removed blocks read go with them
            if readers <= removed:
                saved += int(np.prod(self.g.initializers[name].dims))
        return self.params_total - saved

    def _linear_fractions(self, plan: PrunePlan) -> dict[str, list]:
        """Per projection node: [kept fraction of inputs, kept fraction of outputs, the Linear]."""
        fractions: dict[str, list] = {}

        def scale(linear: Linear, inputs: float = 1.0, outputs: float = 1.0) -> None:
            entry = fractions.setdefault(linear.node, [1.0, 1.0, linear])
            entry[0] *= inputs
            entry[1] *= outputs

        for keep in plan.attention:
            b = keep.block
            f_qk, f_v = _fractions(keep)
            if b.q.node == b.k.node:  # one fused or packed weight for q, k (and v)
                scale(b.q, outputs=(2 * f_qk + f_v) / 3 if b.v.node == b.q.node else f_qk)
                if b.v.node != b.q.node:
                    scale(b.v, outputs=f_v)
            else:
                scale(b.q, outputs=f_qk)
                scale(b.k, outputs=f_qk)
                scale(b.v, outputs=f_v)
            scale(b.out, inputs=f_v)
        for keep in plan.ffn:
            factor = len(keep.hidden) / keep.block.hidden
            scale(keep.block.fc1, outputs=factor)
            scale(keep.block.fc2, inputs=factor)
        if plan.stream is not None:
            factor = len(plan.stream_keep) / plan.stream.width
            for linear in plan.stream.readers.values():
                scale(linear, inputs=factor)
            for linear in plan.stream.writers.values():
                scale(linear, outputs=factor)
        return fractions

    def _removed(self, plan: PrunePlan) -> set[str]:
        return set().union(*(self.layer_nodes[id(layer)] for layer in plan.removed_layers))

    def _nodes_of(self, layer: Layer) -> set[str]:
        start, end = self.g.producer.get(layer.input), self.g.producer.get(layer.output)
        inside = nx.ancestors(self.g.dag, end) | {end}
        if start is not None:
            inside &= nx.descendants(self.g.dag, start)
        return inside


def _fractions(keep: AttentionKeep) -> tuple[float, float]:
    b = keep.block
    whole = b.heads * b.head_dim
    return len(keep.heads) * keep.qk.shape[1] / whole, len(keep.heads) * keep.v.shape[1] / whole
