"""A cost model: the MACs, parameters and latency a plan would have, predicted without rewriting it.

The original model's per-node MACs (from one onnxruntime run's shapes) and initializer sizes
scale linearly with the kept fractions of the widths a node's weights carry, so any plan — and
the cost of one unit of any group — is costed in microseconds, and exactly for the nodes it
counts (MatMul, Gemm, Conv; the report's numbers are measured on the written model).

Latency (profiling.py measures each node's time on the original model) scales the same way for
the products, and also for the work FLOPs do not count: the Softmax, mask and scale ops of an
attention by its kept heads, the ops between a projection and the attention products by the
kept Q/K or V width they carry, the FFN activation by its kept neurons, every op of a removed
block to zero; nodes no cut reaches (the residual Adds and norms without --residual) keep their
time.
"""
from __future__ import annotations

from dataclasses import replace
from enum import Enum

import networkx as nx
import numpy as np

from ..ir.graph import ModelGraph
from ..match import Layer, Linear, Matches
from ..plan import AttentionKeep, PrunePlan


class CostKind(str, Enum):
    FLOPS = "flops"
    PARAMS = "params"
    LATENCY = "latency"  # milliseconds per run of one sample (profiling.NodeTimes)


class CutPart(str, Enum):
    """A part of a cut, in the order removed_by_part applies them."""

    BLOCKS = "blocks"  # whole transformer blocks removed
    HEADS = "heads"  # whole heads (key/value groups with their query heads) at full width
    QK = "qk"  # Q/K pairs within the kept heads
    V = "v"  # V neurons within the kept heads, with the output projection's rows they feed
    FFN = "ffn"  # FFN hidden neurons
    RESIDUAL = "residual"  # residual-stream channels


class CostModel:
    """Predicted MACs per sample, parameters and (given measured node times) latency of a plan."""

    def __init__(self, g: ModelGraph, matches: Matches, macs: dict[str, int], params: int, times=None):
        self.g, self.matches, self.node_macs, self.params_total = g, matches, macs, params
        self.macs_total = sum(macs.values())
        self.times = times  # profiling.NodeTimes, for CostKind.LATENCY
        self._work: dict[str, tuple] | None = None  # the non-product nodes each cut reaches (built when needed)
        self.layer_nodes = {layer: self._nodes_of(layer) for layer in matches.layers}
        self.readers: dict[str, set[str]] = {}  # float initializer → nodes reading it (through Identity)
        for node in g.model.graph.node:
            if node.op_type == "Identity":
                continue
            for tensor in node.input:
                source = g.initializer_behind(tensor) if tensor else None
                if source is not None and g.initializers[source].data_type in (1, 10, 11, 16):
                    self.readers.setdefault(source, set()).add(node.name)

    def original(self, kind: CostKind | str) -> float:
        kind = CostKind(kind)
        if kind is CostKind.LATENCY:
            return self.times.total_ms
        return self.macs_total * 2 if kind is CostKind.FLOPS else self.params_total

    def cost(self, plan: PrunePlan, kind: CostKind | str) -> float:
        kind = CostKind(kind)
        if kind is CostKind.LATENCY:
            return self.latency(plan)
        return self.flops(plan) if kind is CostKind.FLOPS else self.params(plan)

    def flops(self, plan: PrunePlan) -> float:
        scale = self._product_scales(plan)
        return sum(self.node_macs[name] * factor for name, factor in scale.items() if name in self.node_macs) * 2

    def removed_by_part(self, plan: PrunePlan, kind: CostKind | str = CostKind.FLOPS) -> dict[CutPart, float]:
        """What `plan` saves, split by part: the parts applied one after another in CutPart's order,
        each credited with what it saves beyond those before (a head removed is credited whole, its
        pairs and neurons included; the residual cut, which scales what the others kept, comes last).
        The parts telescope: they sum to original - cost(plan)."""
        def full_width(keep: AttentionKeep, heads: int) -> np.ndarray:
            return np.tile(np.arange(keep.block.head_dim), (heads, 1))

        base = replace(plan, attention=tuple(replace(k, qk=full_width(k, k.block.groups), v=full_width(k, k.block.groups),
                                                     heads=np.arange(k.block.groups)) for k in plan.attention),
                       ffn=tuple(replace(k, hidden=np.arange(k.block.hidden)) for k in plan.ffn),
                       removed_layers=(), stream=None, stream_keep=None)
        blocks = replace(base, removed_layers=plan.removed_layers)
        heads = replace(blocks, attention=tuple(replace(k, qk=full_width(k, len(k.heads)), v=full_width(k, len(k.heads)))
                                                for k in plan.attention))
        qk = replace(heads, attention=tuple(replace(k, v=full_width(k, len(k.heads))) for k in plan.attention))
        v = replace(qk, attention=plan.attention)
        ffn = replace(v, ffn=plan.ffn)
        steps = (base, blocks, heads, qk, v, ffn, plan)
        costs = [self.original(kind)] + [self.cost(step, kind) for step in steps[1:]]
        return {part: costs[i] - costs[i + 1] for i, part in enumerate(CutPart)}

    def latency(self, plan: PrunePlan) -> float:
        """Milliseconds per run: every profiled node's time scaled by the share of its work the plan
        keeps, plus the time no node accounts for (session overhead, which no cut changes)."""
        if self.times is None:
            raise ValueError("a latency cost needs measured node times")
        scale = self._work_scales(plan)
        scale.update(self._product_scales(plan))
        return self.times.scaled(scale)

    def _product_scales(self, plan: PrunePlan) -> dict[str, float]:
        """Per node with MACs: the fraction of its work the plan keeps (removed blocks: 0)."""
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
        return scale

    def _work_scales(self, plan: PrunePlan) -> dict[str, float]:
        """Per node without MACs that a cut reaches: the fraction of its elements the plan keeps."""
        work = self._work_nodes()
        scale: dict[str, float] = {}
        if plan.stream is not None:  # elementwise ops on the stream (norms, residual Adds) shrink with it
            kept = len(plan.stream_keep) / plan.stream.width
            for name, outputs in work["stream"]:
                if set(outputs) & plan.stream.tensors:
                    scale[name] = kept
        for keep in plan.attention:
            f_qk, f_v = _fractions(keep)
            shares = {_Role.QK: f_qk, _Role.V: f_v, _Role.QKV: (2 * f_qk + f_v) / 3,
                      _Role.SCORES: len(keep.heads) / keep.block.heads}
            for name, role in work["attention"][keep.block.name].items():
                scale[name] = shares[role]
        for keep in plan.ffn:
            for name in work["ffn"][keep.block.name]:
                scale[name] = len(keep.hidden) / keep.block.hidden
        for name in self._removed(plan):
            scale[name] = 0.0
        return scale

    def _work_nodes(self) -> dict:
        if self._work is None:
            dag = self.g.dag
            attention = {}
            for b in self.matches.attention:
                projections = {b.q.node, b.k.node, b.v.node}
                inside = set().union(*(nx.descendants(dag, n) for n in projections)) & nx.ancestors(dag, b.out.node)
                scores, context = b.core_nodes
                after_scores = nx.descendants(dag, scores) if scores in dag else set()
                after_context = nx.descendants(dag, context) if context in dag else set()
                feeds_scores = nx.ancestors(dag, scores) if scores in dag else set()
                # what reaches attn·V other than through Q·Kᵀ: the V path (and a fused projection)
                feeds_context = nx.ancestors(nx.restricted_view(dag, [scores], []), context) \
                    if context in dag and scores != context else set()
                from_v = nx.descendants(dag, b.v.node)
                from_qk = nx.descendants(dag, b.q.node) | nx.descendants(dag, b.k.node)
                roles = {}
                for name in inside - projections - {scores, context}:
                    if name in after_context:
                        roles[name] = _Role.V
                    elif name in after_scores:
                        roles[name] = _Role.SCORES
                    elif scores != context:  # the two products apart: which one a node feeds tells its width
                        roles[name] = (_Role.QKV if name in feeds_context else _Role.QK) if name in feeds_scores \
                            else _Role.V
                    else:  # one op holds both products: which projection a node comes from tells it
                        roles[name] = (_Role.QKV if name in from_qk else _Role.V) if name in from_v else _Role.QK
                attention[b.name] = roles
            ffn = {b.name: nx.descendants(dag, b.fc1.node) & nx.ancestors(dag, b.fc2.node)
                   for b in self.matches.ffn}
            stream = [(n.name, tuple(n.output)) for n in self.g.model.graph.node]
            self._work = {"attention": attention, "ffn": ffn, "stream": stream}
        return self._work

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
            if b.q.node == b.k.node:  # one fused or packed weight for q, k (and v): H·d | G·d (| G·d) features
                q_width, kv_width = b.heads * b.head_dim, b.groups * b.head_dim
                scale(b.q, outputs=((q_width + kv_width) * f_qk + kv_width * f_v) / (q_width + 2 * kv_width)
                      if b.v.node == b.q.node else f_qk)
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
            if keep.block.gate is not None and keep.block.gate.node != keep.block.fc1.node:  # SwiGLU's gate
                scale(keep.block.gate, outputs=factor)
            scale(keep.block.fc2, inputs=factor)
        if plan.stream is not None:
            factor = len(plan.stream_keep) / plan.stream.width
            for linear in plan.stream.readers:
                scale(linear, inputs=factor)
            for linear in plan.stream.writers:
                scale(linear, outputs=factor)
        return fractions

    def _removed(self, plan: PrunePlan) -> set[str]:
        return set().union(*(self.layer_nodes[layer] for layer in plan.removed_layers))

    def _nodes_of(self, layer: Layer) -> set[str]:
        start, end = self.g.producer.get(layer.input), self.g.producer.get(layer.output)
        inside = nx.ancestors(self.g.dag, end) | {end}
        if start is not None:
            inside &= nx.descendants(self.g.dag, start)
        return inside


class _Role(Enum):
    """Which kept share an attention's non-product node scales with."""

    QK = "qk"  # between the Q or K projection and Q·Kᵀ: kept Q/K width (heads included)
    V = "v"  # on the V path or after attn·V: kept V width
    QKV = "qkv"  # before a fused projection's split: its kept output share
    SCORES = "scores"  # between Q·Kᵀ and attn·V (scale, mask, Softmax): kept heads


def _fractions(keep: AttentionKeep) -> tuple[float, float]:
    b = keep.block
    whole = b.groups * b.head_dim  # keep.heads are key/value groups (each with its query heads)
    return len(keep.heads) * keep.qk.shape[1] / whole, len(keep.heads) * keep.v.shape[1] / whole
