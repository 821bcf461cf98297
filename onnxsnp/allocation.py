"""Choosing the ratios that meet a FLOPs or parameter target with the least measured error.

A cost model predicts the MACs and parameters of a plan from the original model's per-node
MACs and initializer sizes (kept widths scale them linearly), so many plans can be costed
without rewriting. Several allocations of the cut between Q/K pairs, V neurons and FFN neurons
are each scaled to meet the target exactly; the one whose pruned model keeps the highest output
cosine on held-back calibration samples wins. The final numbers in the report are measured on
the written model, not predicted.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import networkx as nx
import numpy as np

from .errors import SnpError
from .graph import ModelGraph
from .importance import Scorer
from .plan import AttentionKeep, PrunePlan, Ratios
from .matching import Layer, Linear, Matches

MAX_RATIO = 0.95
# (Q/K, V, FFN) shares of the cut tried for a target. SNP's Q/K criterion keeps attention
# scores well, so allocations that cut Q/K harder are among them.
ALLOCATIONS = ((1.0, 1.0, 1.0), (1.5, 1.0, 0.8), (2.0, 1.0, 1.0), (1.5, 0.5, 1.0), (0.5, 0.5, 1.2), (1.2, 1.2, 0.6))


@dataclass(frozen=True)
class Target:
    kind: str  # "flops" or "params"
    value: float  # a fraction of the original (0 < value < 1) or an absolute count (>= 1)

    def absolute(self, original: float) -> float:
        return self.value * original if self.value < 1 else self.value


def parse_target(text: str | float, kind: str) -> Target:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise SnpError(f"--target-{kind} must be a fraction of the original (0 < F < 1) or an absolute count, "
                       f"got {text!r}")
    return Target(kind, value)


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


def search(scorer: Scorer, base: Ratios, target: Target, costs: CostModel,
           measure: Callable[[PrunePlan], float], seed: int = 0) -> tuple[PrunePlan, Ratios, list[dict]]:
    """The plan meeting `target` with the highest measured fidelity among ALLOCATIONS.

    Heads, blocks and alignment from `base` are kept; each allocation's overall scale is found by
    bisection on the predicted cost. Returns the plan, its ratios and what was tried."""
    original = costs.macs_total * 2 if target.kind == "flops" else costs.params_total
    goal = target.absolute(original)
    tried, best = [], None
    for shares in ALLOCATIONS:
        ratios_for = lambda s, m=shares: replace(base, qk=min(MAX_RATIO, m[0] * s), v=min(MAX_RATIO, m[1] * s),  # noqa: E731
                                                 ffn=min(MAX_RATIO, m[2] * s))
        if costs.cost(scorer.plan(ratios_for(10.0), seed), target.kind) > goal:
            tried.append({"shares": shares, "reachable": False})
            continue
        low, high = 0.0, 10.0
        for _ in range(30):
            middle = (low + high) / 2
            if costs.cost(scorer.plan(ratios_for(middle), seed), target.kind) <= goal:
                high = middle
            else:
                low = middle
        ratios = ratios_for(high)
        plan = scorer.plan(ratios, seed)
        cosine = measure(plan)
        tried.append({"shares": shares, "ratios": (round(ratios.qk, 3), round(ratios.v, 3), round(ratios.ffn, 3)),
                      "predicted": costs.cost(plan, target.kind), "cosine": cosine})
        if best is None or cosine > best[0]:
            best = (cosine, plan, ratios)
    if best is None:
        raise SnpError(f"--target-{target.kind} {target.value:g} cannot be met by neuron pruning alone (at most "
                       f"{MAX_RATIO:.0%} of a group is removed); add --heads or --blocks, or aim higher")
    return best[1], best[2], tried
