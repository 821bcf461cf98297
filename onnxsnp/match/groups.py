"""Dependency groups (the Torch-Pruning model): every weight axis, shape entry and attribute
that a cut of one set of units touches, with the map from unit to index.

Units are numbered 0…size−1 along a group's root axis — Q/K pairs and V neurons as
head·d + j, FFN hidden neurons, residual channels. A weight holds them along one axis from
an offset (q, k and v of a fused or packed projection sit side by side); it either writes them
(output columns, bias: zeroing these removes the unit) or reads them (input rows). Shape
entries and attributes take a new width after the cut. `rewriting.cut` slices a plan's groups
in one generic pass; the test oracle (tests/oracle.py) checks the result against the original
with the removed units' activations masked, found without these groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir.graph import ModelGraph, attribute
from .blocks import AttentionBlock, AttentionForm, FfnBlock, Linear, ShapeEdit, Width


@dataclass(frozen=True)
class WeightAxis:
    node: str  # the node reading the constant
    index: int  # which of its inputs
    axis: int  # the axis the units run along
    offset: int = 0  # unit i is index offset + i
    reads: bool = False  # input rows of a layer reading the units; else it writes them
    repeat: int = 1  # grouped-query attention: unit g·block + j sits at (g·repeat + r)·block + j, r < repeat
    block: int = 1

    def indices(self, units: np.ndarray) -> np.ndarray:
        """Where units sit along the axis, (units, repeat): one column per copy of a repeated unit."""
        units = np.asarray(units, dtype=np.int64).reshape(-1)
        if self.repeat == 1:
            return (self.offset + units)[:, None]
        group, within = units // self.block, units % self.block
        copies = np.arange(self.repeat)
        return self.offset + ((group[:, None] * self.repeat + copies[None, :]) * self.block + within[:, None])


@dataclass(frozen=True)
class AttributeEdit:
    node: str
    name: str
    widths: tuple[Width, ...]  # its new value: these widths (one: an int, several: a list)


@dataclass(frozen=True)
class Group:
    name: str
    size: int
    weights: tuple[WeightAxis, ...]
    shapes: tuple[ShapeEdit, ...] = ()
    attributes: tuple[AttributeEdit, ...] = ()


def writes(linear: Linear, offset: int = 0, merged: Width | None = None, repeat: int = 1, block: int = 1) -> list:
    """The output columns (and bias entries) of `linear` from `offset` on, and the Reshape that
    restores its tokens (its last entry: `merged`); `repeat`: each unit written that many times
    (the query heads of a key/value group)."""
    found: list = [WeightAxis(linear.node, linear.weight_index, 0 if linear.transposed else 1, offset,
                              repeat=repeat, block=block)]
    if linear.bias is not None:
        found.append(WeightAxis(linear.bias_node, linear.bias_index, -1, offset, repeat=repeat, block=block))
    if linear.out_reshape is not None and merged is not None:
        found.append(ShapeEdit(linear.out_reshape, merged, -1))
    return found


def reads(linear: Linear, merged: Width, repeat: int = 1, block: int = 1) -> list:
    """The input rows of `linear`, and the Reshape that flattens its tokens (last entry: `merged`)."""
    found: list = [WeightAxis(linear.node, linear.weight_index, 1 if linear.transposed else 0, reads=True,
                              repeat=repeat, block=block)]
    if linear.in_reshape is not None:
        found.append(ShapeEdit(linear.in_reshape, merged, -1))
    return found


def group(name: str, size: int, parts: list, attributes: tuple[AttributeEdit, ...] = ()) -> Group:
    return Group(name, size, tuple(p for p in parts if isinstance(p, WeightAxis)),
                 tuple(p for p in parts if isinstance(p, ShapeEdit)), attributes)


_QK_EDITS = (Width.QK, Width.QK_MERGED, Width.HEADS, Width.KV_HEADS, Width.KV_QK_MERGED, Width.QK_HALF,
             Width.QK_THEN_KV, Width.QK_ROTATED, Width.QK_ROTATED_HALF)
_V_EDITS = (Width.V, Width.V_MERGED, Width.KV_V_MERGED)


def attention_groups(g: ModelGraph | None, block: AttentionBlock) -> tuple[Group, Group]:
    """(Q/K pairs, V neurons) of an attention block, each numbered head·d + j over its key/value
    heads (without `g`: the weights and shapes only, not the attributes of an attention op). With
    grouped-query attention a Q/K unit is key neuron j of head g with query neuron j of every query
    head of group g, and a V neuron feeds the output projection once per query head of its group."""
    d, r = block.head_dim, block.group_size
    width = block.groups * d
    q_off, k_off, v_off = block.column_offsets
    one = block.q.node == block.k.node == block.v.node  # fused or packed: one output holds q|k|v
    merged = (Width.FUSED,) * 2 if one else (Width.QK_MERGED, Width.KV_V_MERGED)
    qk = writes(block.q, q_off, merged[0], r, d) + writes(block.k, k_off, None if one else Width.KV_QK_MERGED)
    v = writes(block.v, v_off, None if one else merged[1]) + reads(block.out, Width.V_MERGED, r, d)
    if block.packed_bias is not None:  # MultiHeadAttention's [q | k | v] bias input
        qk += [WeightAxis(block.attention_op, 3, 0, 0), WeightAxis(block.attention_op, 3, 0, width)]
        v.append(WeightAxis(block.attention_op, 3, 0, 2 * width))
    qk += [e for e in block.shape_edits if e.width in _QK_EDITS]
    v += [e for e in block.shape_edits if e.width in _V_EDITS]
    attributes = []
    if block.attention_op is not None and g is not None:  # ops that carry the head count or widths as attributes
        node = g.node(block.attention_op)
        attributes = [AttributeEdit(block.attention_op, name, (Width.KV_HEADS if name == "kv_num_heads" else Width.HEADS,))
                      for name in ("num_heads", "q_num_heads", "kv_num_heads") if attribute(node, name) is not None]
        if block.form is AttentionForm.ORT_ATTENTION:
            attributes.append(AttributeEdit(block.attention_op, "qkv_hidden_sizes",
                                            (Width.QK_MERGED, Width.QK_MERGED, Width.V_MERGED)))
    for rotary in block.rotary if g is not None else ():  # the ONNX RotaryEmbedding op may name its heads
        if rotary.per_token and attribute(g.node(rotary.node), "num_heads") is not None:
            attributes.append(AttributeEdit(rotary.node, "num_heads", (
                Width.KV_HEADS if rotary.heads == block.groups else Width.HEADS,)))
    return group(f"{block.name}/qk", width, qk, tuple(attributes)), group(f"{block.name}/v", width, v)


def ffn_group(block: FfnBlock) -> Group:
    fc1_at, gate_at = block.columns
    gate = writes(block.gate, gate_at, Width.FFN) if block.gate is not None else []  # SwiGLU/GeGLU: the gate's columns too
    return group(f"{block.name}/hidden", block.hidden,
                 writes(block.fc1, fc1_at, Width.FFN) + gate + reads(block.fc2, Width.FFN) + list(block.shape_edits))


@dataclass(frozen=True)
class Cut:
    """Units `keep` (ascending) of a group kept; its shape entries and attributes take `sizes`."""

    group: Group
    keep: np.ndarray
    sizes: dict[Width, int]

    def removed(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.group.size), self.keep)
