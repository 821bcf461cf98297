"""Pruning as zeroed weights: the full-width weights of a plan, removed units set to zero.

Removing a unit and zeroing the weights that carry it compute the same thing:
- a Q/K pair: its q and k columns (and bias entries) are zero, so it adds nothing to Q·Kᵀ;
- a V neuron or whole head: the output projection's input rows for it are zero;
- an FFN neuron: fc2's input row for it is zero (exact whatever the activation does at 0).
So every stage that needs "the model as it would be after this plan" without rewriting it —
the block-by-block reconstruction, which runs the original graph with these weights fed in,
and the tests' oracle for the rewrite — reads the same arrays from here.

A weight is addressed by a `Slot`: the node that reads it and the input index, not by its
tensor name, because exporters share one initializer between several readers (legacy
exports route identical biases through Identity) and only one reader may change.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from .compensation import Refit
from .graph import ModelGraph
from .importance import AttentionKeep, FfnKeep, PrunePlan
from .matching import AttentionBlock, FfnBlock, Linear
from .matching.groups import Group, attention_groups, ffn_group

Slot = tuple[str, int]  # (node name, input index)


def _slots(*groups: Group) -> list[Slot]:
    return list(dict.fromkeys((w.node, w.index) for group in groups for w in group.weights))


def attention_slots(block: AttentionBlock) -> list[Slot]:
    """Every weight a plan for this attention block may change: those of its dependency groups."""
    return _slots(*attention_groups(None, block))


def ffn_slots(block: FfnBlock) -> list[Slot]:
    return _slots(ffn_group(block))


class Weights:
    """Full-width weight arrays by slot, copied from the graph on first change."""

    def __init__(self, g: ModelGraph, slots: Iterable[Slot] = ()):
        self.g = g
        self.values: dict[Slot, np.ndarray] = {}
        for slot in slots:
            self.values[slot] = self.original(slot)

    def original(self, slot: Slot) -> np.ndarray:
        node, index = slot
        value = self.g.constant(self.g.node(node).input[index])
        assert value is not None, f"{slot} is not a constant"
        return value

    def editable(self, slot: Slot) -> np.ndarray:
        value = self.values.get(slot)
        if value is None or value is self.original(slot):
            value = self.original(slot).copy()
            self.values[slot] = value
        return value

    # --- edits --------------------------------------------------------------------------------
    def zero_units(self, group: Group, removed: np.ndarray) -> None:
        """Every weight that writes the `removed` units of `group` set to zero there (output
        columns, bias entries, a packed bias's parts: whatever the group lists)."""
        for weight in group.weights:
            if not weight.reads:
                value = self.editable((weight.node, weight.index))
                index = [slice(None)] * value.ndim
                index[weight.axis] = weight.offset + removed
                value[tuple(index)] = 0

    def zero_outputs(self, linear: Linear, columns: np.ndarray) -> None:
        """Output features `columns` of `linear` (weight columns, bias entries) set to zero."""
        weight = self.editable((linear.node, linear.weight_index))
        if linear.transposed:
            weight[columns, :] = 0
        else:
            weight[:, columns] = 0
        if linear.bias is not None:
            self.editable((linear.bias_node, linear.bias_index)).reshape(-1)[columns] = 0

    def scale_outputs(self, linear: Linear, columns: np.ndarray, factors: np.ndarray) -> None:
        weight = self.editable((linear.node, linear.weight_index))
        factors = factors.astype(weight.dtype)
        if linear.transposed:
            weight[columns, :] *= factors[:, None]
        else:
            weight[:, columns] *= factors
        if linear.bias is not None:
            bias = self.editable((linear.bias_node, linear.bias_index)).reshape(-1)
            bias[columns] *= factors.astype(bias.dtype)

    def set_inputs(self, linear: Linear, rows: np.ndarray, refit: Refit | None) -> None:
        """Only input features `rows` of `linear` stay (the rest read zero weights); with a refit,
        its weights go into those rows and its bias replaces the bias."""
        weight = self.editable((linear.node, linear.weight_index))
        view = weight.T if linear.transposed else weight  # [in, out]
        if refit is None:
            kept = view[rows].copy()
            view[...] = 0
            view[rows] = kept
            return
        view[...] = 0
        view[rows] = refit.weight.astype(weight.dtype)
        if refit.bias is not None and linear.bias is not None:
            bias = self.editable((linear.bias_node, linear.bias_index))
            bias[...] = refit.bias.reshape(bias.shape).astype(bias.dtype)

    def apply_attention(self, keep: AttentionKeep, refit: Refit | None = None,
                        q_scales: np.ndarray | None = None) -> None:
        block = keep.block
        qk_kept = keep.qk_columns()
        qk, _ = attention_groups(None, block)
        self.zero_units(qk, np.setdiff1d(np.arange(qk.size), qk_kept))
        q_off = block.column_offsets[0]
        if q_scales is not None:
            factors = np.asarray(q_scales, dtype=np.float64).reshape(-1)
            self.scale_outputs(block.q, q_off + qk_kept, factors)
            if block.packed_bias is not None:
                packed = self.editable((block.attention_op, 3))
                packed[qk_kept] *= factors.astype(packed.dtype)
        self.set_inputs(block.out, keep.v_columns(), refit)

    def apply_ffn(self, keep: FfnKeep, refit: Refit | None = None) -> None:
        self.set_inputs(keep.block.fc2, keep.hidden, refit)


def plan_weights(g: ModelGraph, plan: PrunePlan) -> Weights:
    """The weights of every block of `plan`, as zeroing would give them (refits and Q/K
    rescales included)."""
    weights = Weights(g)
    for keep in plan.attention:
        weights.apply_attention(keep, plan.refits.get(keep.block.out.node), plan.qk_scales.get(keep.block.name))
    for keep in plan.ffn:
        weights.apply_ffn(keep, plan.refits.get(keep.block.fc2.node))
    return weights


def with_weights(model: onnx.ModelProto, weights: Weights) -> onnx.ModelProto:
    """A copy of `model` whose slots read the given arrays (each slot its own new initializer)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    nodes = {node.name: node for node in copy.graph.node}
    for number, ((node_name, index), value) in enumerate(weights.values.items()):
        name = f"{nodes[node_name].input[index]}__zeroed{number}"
        copy.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        nodes[node_name].input[index] = name
    return copy
