"""Editing the graph with onnx-graphsurgeon: constants sliced or rewritten (a quantized weight
in its integer form, quantized.py), shape entries set, tensors rerouted, and the one generic
cut of dependency groups (matching/groups.py) that every pruning step goes through.

Every changed weight becomes a new initializer (an initializer shared by several readers, as
the legacy exporter's Identity routing makes them, is never sliced in place for one of them);
every changed shape becomes a new constant or node.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..ir import external
from ..ir.graph import ModelGraph
from ..match import Linear
from ..match.groups import Cut
from ..ir.quantized import chain_behind, chain_signature, requantized, rescaled, sliced
from .known import Decoded, Known, Levels, Scaled, Taken, scaled
from .lazy import read, to_file


class Editor:
    def __init__(self, g: ModelGraph, graph: gs.Graph, spill: external.Spill | None = None):
        self.g = g
        self.graph = graph
        self.spill = spill  # where the larger new constants go as they are made (lazy.py)
        self.nodes = {n.name: n for n in graph.nodes}
        self.tensors = graph.tensors()
        # the float values of the dequantizing chains this rewrite wrote, as recipes (known.py)
        self.known: dict[str, Known] = {}
        self.gathered: dict[tuple, gs.Variable] = {}  # (rotary table, kept columns) → its gathered table, made once
        self.entries: dict[tuple[str, int, int], gs.Tensor] = {}  # (shape, position, value) → the edited shape
        self._count = 0

    def unique(self, base: str) -> str:
        self._count += 1
        name = f"{base}__snp{self._count}"
        while name in self.tensors:
            self._count += 1
            name = f"{base}__snp{self._count}"
        return name

    def constant(self, base: str, values: np.ndarray) -> gs.Constant:
        values = np.asarray(values)  # (np.ascontiguousarray would turn a scalar into shape (1,))
        tensor = gs.Constant(self.unique(base), values if values.flags.c_contiguous else values.copy())
        if self.spill is not None:
            to_file(tensor, self.spill)
        self.tensors[tensor.name] = tensor
        return tensor

    def variable(self, base: str, dtype=None) -> gs.Variable:
        tensor = gs.Variable(self.unique(base), dtype=dtype)
        self.tensors[tensor.name] = tensor
        return tensor

    def add_node(self, op: str, inputs: list, outputs: list, attrs: dict | None = None) -> gs.Node:
        node = gs.Node(op, name=self.unique(op), attrs=attrs or {}, inputs=inputs, outputs=outputs)
        self.graph.nodes.append(node)
        return node

    def value(self, tensor: str) -> np.ndarray:
        value = self.g.constant(tensor)
        if value is None:
            raise ValueError(f"{tensor} is not a constant")
        return value

    def current(self, node: gs.Node, index: int) -> np.ndarray:
        """The value a node input holds now: edits made earlier in this rewrite included. A weight
        is decoded for the caller and not kept (lazy.py, known.py): asked again, it is decoded again."""
        tensor = node.inputs[index]
        if tensor.name in self.known:
            return self.known[tensor.name].value()
        return read(tensor) if isinstance(tensor, gs.Constant) else self.value(tensor.name)

    def _held(self, node: gs.Node, index: int) -> Known:
        """What `current` would return, as a recipe: made when read, its shape and dtype known."""
        tensor = node.inputs[index]
        if tensor.name in self.known:
            return self.known[tensor.name]
        if isinstance(tensor, gs.Constant):
            dtype = tensor.dtype if isinstance(tensor.dtype, np.dtype) else read(tensor).dtype  # (an ONNX-only type)
            return Decoded(lambda: read(tensor), tuple(tensor.shape), dtype)
        chain = chain_behind(tensor)
        signature = None if chain is None else chain_signature(chain)
        if signature is None:  # a weight computed otherwise: its signature is its value's
            value = self.value(tensor.name)
            signature = (value.shape, value.dtype)
        return Decoded(lambda: self.value(tensor.name), *signature)

    def shape(self, node: gs.Node, index: int) -> tuple[int, ...]:
        """The shape of what `current` would return, without decoding a weight for it."""
        return tuple(self._held(node, index).shape)

    def dtype(self, node: gs.Node, index: int) -> np.dtype:
        """The dtype of what `current` would return, without decoding a weight for it."""
        return np.dtype(self._held(node, index).dtype)

    def replace_input(self, node: gs.Node, index: int, values: np.ndarray) -> None:
        node.inputs[index] = self.constant(node.inputs[index].name, values)

    def take(self, node: gs.Node, index: int, keep: np.ndarray, axis: int) -> None:
        """Keep only indices `keep` along `axis` of a constant input; a quantized weight is sliced
        in its integer form, with its per-channel scale and zero point (quantized.py)."""
        chain = None if isinstance(node.inputs[index], gs.Constant) else chain_behind(node.inputs[index])
        if chain is None:
            self.replace_input(node, index, np.take(self.current(node, index), keep, axis))
            return
        kept = Taken(self._held(node, index), keep, axis)
        node.inputs[index] = sliced(chain, axis, keep, self)
        self.known[node.inputs[index].name] = kept

    def scale_along(self, node: gs.Node, index: int, columns: np.ndarray, factors: np.ndarray, axis: int,
                    exact_only: bool = False) -> bool:
        """Multiply indices `columns` along `axis` of a constant input by `factors`. A quantized
        weight takes them on its scale where that is exact, else (unless `exact_only`) is
        quantized again. Returns whether it was done."""
        chain = None if isinstance(node.inputs[index], gs.Constant) else chain_behind(node.inputs[index])
        if chain is None:
            self.replace_input(node, index, scaled(self.current(node, index), columns, factors, axis))
            return True
        exact = rescaled(chain, axis, columns, factors, self)
        if exact is None and exact_only:
            return False
        if exact is None:
            self.write(node, index, scaled(self.current(node, index), columns, factors, axis))
        else:
            node.inputs[index], self.known[exact.name] = exact, Scaled(self._held(node, index), columns, factors, axis)
        return True

    def write(self, node: gs.Node, index: int, values: np.ndarray, gram: np.ndarray | None = None,
              rows: int = 0) -> None:
        """Give a constant input new values; a quantized weight is quantized again with its scheme
        (with error feedback where `gram`, Σ x xᵀ of the inputs along axis `rows`, is given)."""
        chain = None if isinstance(node.inputs[index], gs.Constant) else chain_behind(node.inputs[index])
        written = None if chain is None else requantized(chain, values, self, gram, rows)
        if written is None:
            self.replace_input(node, index, values)
            return
        tensor, levels, zero, scale = written
        node.inputs[index], self.known[tensor.name] = tensor, Levels(levels, zero, scale, values.dtype)

    # --- linear layers -------------------------------------------------------------------
    def set_weights(self, linear: Linear, weight: np.ndarray, bias: np.ndarray | None,
                    gram: np.ndarray | None = None) -> None:
        """Replace a projection's weight (given [in, out]) and bias, keeping their dtypes; `gram`:
        Σ x xᵀ of its inputs, where a quantized weight is rounded with error feedback."""
        node = self.nodes[linear.node]
        dtype = self.dtype(node, linear.weight_index)
        self.write(node, linear.weight_index, (weight.T if linear.transposed else weight).astype(dtype), gram,
                   1 if linear.transposed else 0)
        if bias is not None and linear.bias is not None:
            bias_node = self.nodes[linear.bias_node]
            shape, dtype = self.shape(bias_node, linear.bias_index), self.dtype(bias_node, linear.bias_index)
            self.write(bias_node, linear.bias_index, bias.reshape(shape).astype(dtype))

    # --- dependency groups ---------------------------------------------------------------------
    def cut(self, cuts: list[Cut], done: frozenset[tuple[str, int, int]] = frozenset()) -> None:
        """Apply every cut of a plan: the one generic slice of dependency groups. The kept indices
        of each weight axis are gathered over all groups (q, k and v of a fused weight are three
        spans of one axis) and taken at once; `done` lists (node, input, axis) already written
        (refitted layers); then the shape entries and attributes take their new widths."""
        spans: dict[tuple[str, int, int], list] = {}
        for cut in cuts:
            for weight in cut.group.weights:
                spans.setdefault((weight.node, weight.index, weight.axis), []).append((weight, cut))
        for (node, index, axis), parts in spans.items():
            if (node, index, axis) in done:
                continue
            kept = np.ones(self.shape(self.nodes[node], index)[axis], dtype=bool)
            for weight, cut in parts:
                kept[weight.indices(np.arange(cut.group.size)).reshape(-1)] = False
                kept[weight.indices(cut.keep).reshape(-1)] = True
            if not kept.all():
                self.take(self.nodes[node], index, np.flatnonzero(kept), axis)
        for cut in cuts:
            for edit in cut.group.shapes:
                self.set_entry(edit.reshape, edit.position, cut.sizes[edit.width], edit.input)
            for edit in cut.group.attributes:
                values = [cut.sizes[width] for width in edit.widths]
                self.nodes[edit.node].attrs[edit.name] = values[0] if len(values) == 1 else values

    # --- shapes ----------------------------------------------------------------------------
    def shape_with_tail(self, shape: gs.Tensor, drop: int, tail: list[int]) -> gs.Tensor:
        """A shape tensor equal to shape[:-drop] + tail, folded where `shape` is constant."""
        tail_array = np.array(tail, dtype=np.int64)
        constant = self.g.constant(shape.name)
        if constant is not None:
            return self.constant(shape.name, np.concatenate([constant[:-drop], tail_array]))
        out = self.variable(shape.name, np.int64)
        self.add_node("Concat", [self.slice(shape, 0, -drop), self.constant(shape.name, tail_array)], [out], {"axis": 0})
        return out

    def set_entry(self, reshape: str, position: int, value: int, input_index: int = 1) -> None:
        """Set entry `position` (counted from the end) of a Reshape's target shape to `value` (or of
        another input holding sizes: Split's, Slice's bounds). The edited shape is made once per
        (shape, position, value): the exporters share one shape tensor among q, k, v and all
        layers, and a node per reader would run on every decode step (issue 28)."""
        node = self.nodes[reshape]
        shape = node.inputs[input_index]
        key = (shape.name, position, value)
        if key not in self.entries:
            self.entries[key] = self._with_entry(shape, position, value, input_index == 1, reshape)
        node.inputs[input_index] = self.entries[key]

    def _with_entry(self, shape: gs.Tensor, position: int, value: int, runtime_ok: bool, reader: str) -> gs.Tensor:
        constant = self._constant_value(shape)
        if constant is not None:
            return self._constant_with_entry(shape, constant, position, value)
        if not runtime_ok:
            raise ValueError(f"the sizes {shape.name} of {reader} are not a constant")
        producer = shape.inputs[0] if shape.inputs else None
        if producer is not None and producer.op == "Concat":
            sizes = [self._length(piece) for piece in producer.inputs]
            if all(s is not None for s in sizes):
                ends = np.cumsum(sizes)
                index = int(ends[-1]) + position
                at = int(np.searchsorted(ends, index, side="right"))
                piece = producer.inputs[at]
                values = self._constant_value(piece)
                if values is not None or sizes[at] == 1:  # replace that piece alone: the rest is kept as is
                    if values is None:
                        replaced = self.constant(shape.name, np.array([value], dtype=np.int64))
                    else:  # a constant piece of several entries (or one edited before) keeps the others
                        replaced = self._constant_with_entry(piece, values, index - int(ends[at]), value)
                        if replaced is piece:
                            return shape
                    inputs = list(producer.inputs)
                    inputs[at] = replaced
                    out = self.variable(shape.name, np.int64)
                    self.add_node("Concat", inputs, [out], {"axis": 0})
                    return out
        # anything else: splice the entry in at run time
        parts = [self.slice(shape, 0, position), self.constant(shape.name, np.array([value], dtype=np.int64))]
        if position != -1:
            parts.append(self.slice(shape, position + 1, np.iinfo(np.int64).max))
        out = self.variable(shape.name, np.int64)
        self.add_node("Concat", parts, [out], {"axis": 0})
        return out

    def _constant_value(self, tensor: gs.Tensor) -> np.ndarray | None:
        """A tensor's value where it is a constant: one this rewrite made, or one of the model."""
        return tensor.values if isinstance(tensor, gs.Constant) else self.g.constant(tensor.name)

    def _constant_with_entry(self, tensor: gs.Tensor, values: np.ndarray, position: int, value: int) -> gs.Tensor:
        if values.reshape(-1)[position] == value:
            return tensor
        changed = values.copy()
        changed.reshape(-1)[position] = value
        return self.constant(tensor.name, changed)

    def _length(self, piece: gs.Tensor) -> int | None:
        """Entries of a 1-D piece of a shape Concat, where known before running the model."""
        values = self._constant_value(piece)
        if values is not None:
            return int(values.size)
        shape = self.g.shapes.get(piece.name)
        return shape[0] if shape is not None and len(shape) == 1 and isinstance(shape[0], int) else None

    def squeeze(self, tensor: gs.Tensor, axis: int) -> gs.Variable:
        out = self.variable(tensor.name)
        if self.graph.opset >= 13:
            self.add_node("Squeeze", [tensor, self.constant("axes", np.array([axis], dtype=np.int64))], [out])
        else:
            self.add_node("Squeeze", [tensor], [out], {"axes": [axis]})
        return out

    def slice(self, tensor: gs.Tensor, start: int, end: int) -> gs.Variable:
        out = self.variable(tensor.name, np.int64)
        self.add_node("Slice", [tensor, self.constant("starts", np.array([start])), self.constant("ends", np.array([end]))],
                      [out])
        return out

    def bypass(self, source: str, target: str) -> None:
        """Drop everything between two tensors: readers of `target` read `source` instead. A graph
        output keeps its name, through an Identity."""
        new = self.tensors[source]
        target_tensor = self.tensors[target]
        if any(t is target_tensor for t in self.graph.outputs):
            for producer in list(target_tensor.inputs):
                producer.outputs = [self.variable(target) if t is target_tensor else t for t in producer.outputs]
            self.add_node("Identity", [new], [target_tensor])
            return
        self.reroute(target, new)

    def reroute(self, old: str, new: gs.Tensor) -> None:
        """Make every reader of tensor `old` read `new` instead."""
        tensor = self.tensors[old]
        for consumer in list(tensor.outputs):
            for index, current in enumerate(consumer.inputs):
                if current is tensor:
                    consumer.inputs[index] = new
        self.graph.outputs = [new if t is tensor else t for t in self.graph.outputs]
