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
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..ir.graph import ModelGraph
from ..match import AttentionBlock, FfnBlock, Linear
from ..match.groups import Group, attention_groups, ffn_group
from ..plan import AttentionKeep, FfnKeep, PrunePlan, Refit, head_columns
from .qk_norm import cuts_within, gains, slots as norm_slots

Slot = tuple[str, int]  # (node name, input index)


@dataclass(frozen=True)
class ColumnWrite:
    """New values for some output features of a weight (or entries of a bias) given by slot."""

    slot: Slot
    axis: int  # the axis of the slot's array that indexes output features
    positions: np.ndarray
    values: np.ndarray  # laid out along `axis`


def mapped_columns(g: ModelGraph, keep: AttentionKeep) -> list[ColumnWrite]:
    """What the kept Q, K and V positions hold where the keep maps them (plan.AttentionKeep):
    for every weight axis that writes the group's units (output columns, biases, a packed
    bias's part), the mapped combination of each kept head's original entries."""
    block = keep.block
    d = block.head_dim
    qk_group, v_group = attention_groups(None, block)
    writes = []
    in_norm = block.qk_norm is not None and block.qk_whole is None  # the Q/K rescale goes into the norms' γ (qk_norm.py)
    for group, mapping, kept, part in ((qk_group, keep.q_map, keep.qk, 0), (qk_group, keep.k_map, keep.qk, 1),
                                       (v_group, keep.v_map, keep.v, 2)):
        if mapping is None or in_norm and part < 2:
            continue
        for weight in _part_axes(group, block, part):
            value = g.constant(g.node(weight.node).input[weight.index]).astype(np.float64)
            along = np.moveaxis(value, weight.axis, -1)
            positions, mapped = [], []
            for head, rows, m in zip(keep.heads, kept, mapping):
                sources = weight.indices(np.arange(head * d, (head + 1) * d))  # (d, copies)
                targets = weight.indices(head * d + rows)
                for copy in range(sources.shape[1]):  # every query head of a key/value group alike
                    positions.append(targets[:, copy])
                    mapped.append(along[..., sources[:, copy]] @ m)
            axis = weight.axis % value.ndim
            writes.append(ColumnWrite((weight.node, weight.index), axis, np.concatenate(positions),
                                      np.moveaxis(np.concatenate(mapped, axis=-1), -1, axis)))
    return writes


def _part_axes(group: Group, block: AttentionBlock, part: int) -> list:
    """The weight axes of `group` that write q (part 0), k (1) or v (2): by their offset in a
    fused or packed weight, else by the projection that owns them."""
    owners = {0: (block.q.node, block.q.bias_node), 1: (block.k.node, block.k.bias_node),
              2: (block.v.node, block.v.bias_node)}[part]
    width = block.heads * block.head_dim
    found = []
    for weight in group.weights:
        if weight.reads:
            continue
        if block.packed_bias is not None and (weight.node, weight.index) == (block.attention_op, 3):
            if weight.offset == part * width:
                found.append(weight)
        elif block.q.node == block.k.node:  # fused or packed projection: the part by its offset
            if weight.offset == block.column_offsets[part]:
                found.append(weight)
        elif weight.node in owners:
            found.append(weight)
    return found


def _slots(*groups: Group) -> list[Slot]:
    return list(dict.fromkeys((w.node, w.index) for group in groups for w in group.weights))


def attention_slots(block: AttentionBlock) -> list[Slot]:
    """Every weight a plan for this attention block may change: those of its dependency groups."""
    return _slots(*attention_groups(None, block)) + norm_slots(block)


def ffn_slots(block: FfnBlock) -> list[Slot]:
    return _slots(ffn_group(block))


class _Current(dict):
    """The edited arrays by slot (what it holds and iterates); any other slot of `weights.slots`
    reads its original, decoded where asked and not kept: a reconstruction holds the weights it
    changed, not every original beside them (docs/SCALING.md, "Sixth round")."""

    def __init__(self, weights: Weights, edited=()):
        super().__init__(edited)
        self._weights = weights

    def __missing__(self, slot: Slot) -> np.ndarray:
        if slot in self._weights.slots:
            return self._weights.original(slot)
        raise KeyError(slot)

    def __contains__(self, slot) -> bool:
        return dict.__contains__(self, slot) or slot in self._weights.slots


class Weights:
    """Full-width weight arrays by slot, copied from the graph on first change. `values[slot]`
    is the current array of any slot given (the original where unchanged)."""

    def __init__(self, g: ModelGraph, slots: Iterable[Slot] = ()):
        self.g = g
        self.slots = frozenset(slots)
        self._values = _Current(self)

    @property
    def values(self) -> _Current:
        return self._values

    @values.setter
    def values(self, edited: dict[Slot, np.ndarray]) -> None:  # a saved copy of `values` put back
        self._values = _Current(self, edited)

    def original(self, slot: Slot) -> np.ndarray:
        node, index = slot
        with self.g.decoding_once():  # read again where asked: a large weight is not kept by the graph
            value = self.g.constant(self.g.node(node).input[index])
        assert value is not None, f"{slot} is not a constant"
        return value

    def editable(self, slot: Slot) -> np.ndarray:
        value = self._values.get(slot)
        if value is None:
            value = self.original(slot).copy()
            self._values[slot] = value
        return value

    def forget(self, slots: Iterable[Slot]) -> None:
        """Changes to `slots` dropped (what is read of them again is the original)."""
        for slot in slots:
            self._values.pop(slot, None)

    # --- edits --------------------------------------------------------------------------------
    def zero_units(self, group: Group, removed: np.ndarray) -> None:
        """Every weight that writes the `removed` units of `group` set to zero there (output
        columns, bias entries, a packed bias's parts: whatever the group lists)."""
        for weight in group.weights:
            if not weight.reads:
                value = self.editable((weight.node, weight.index))
                index = [slice(None)] * value.ndim
                index[weight.axis] = weight.indices(removed).reshape(-1)
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

    def write(self, column: ColumnWrite) -> None:
        array = self.editable(column.slot)
        index = [slice(None)] * array.ndim
        index[column.axis] = column.positions
        array[tuple(index)] = column.values.astype(array.dtype)

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

    def apply_attention(self, keep: AttentionKeep, refit: Refit | None = None) -> None:
        """Mapped columns written, removed Q/K pairs zeroed, removed V neurons and heads cut
        from the output projection (or its refit put in)."""
        block = keep.block
        for column in mapped_columns(self.g, keep):
            self.write(column)
        qk, _ = attention_groups(None, block)
        self.zero_units(qk, np.setdiff1d(np.arange(qk.size), keep.qk_columns()))
        if cuts_within(keep):  # a per-head QK-norm's γ and ε, as the zeroed dims need them
            for slot, value in gains(self.g, keep, zeroed=True):
                self.values[slot] = value
        self.set_inputs(block.out, keep.out_rows(), refit)

    def apply_ffn(self, keep: FfnKeep, refit: Refit | None = None) -> None:
        self.set_inputs(keep.block.fc2, keep.hidden, refit)


def plan_weights(g: ModelGraph, plan: PrunePlan) -> Weights:
    """The weights of every block of `plan`, as zeroing would give them (refits and Q/K
    rescales included)."""
    weights = Weights(g)
    for keep in plan.attention:
        weights.apply_attention(keep, plan.refits.get(keep.block.out.node))
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
    read = {t for node in copy.graph.node for t in node.input} | {o.name for o in copy.graph.output}
    kept = [t for t in copy.graph.initializer if t.name in read]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    return copy
