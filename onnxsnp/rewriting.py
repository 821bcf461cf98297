"""Stage 6: apply a prune plan to the model with onnx-graphsurgeon.

Every changed weight becomes a new initializer (an initializer shared by several readers, as
the legacy exporter's Identity routing makes them, is never sliced in place for one of them);
every changed shape becomes a new constant or node. Dead nodes and initializers are dropped by
graphsurgeon's cleanup at the end.
"""
from __future__ import annotations

import math
import re

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import ModelGraph
from .importance import AttentionKeep, PrunePlan
from .matching import Linear
from .quantized import chain_behind, requantized, rescaled, sliced
from .residual import ResidualStream


class _Editor:
    def __init__(self, g: ModelGraph, graph: gs.Graph):
        self.g = g
        self.graph = graph
        self.nodes = {n.name: n for n in graph.nodes}
        self.tensors = graph.tensors()
        self.known: dict[str, np.ndarray] = {}  # values of the dequantizing chains this rewrite wrote
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
        """The value a node input holds now: edits made earlier in this rewrite included."""
        tensor = node.inputs[index]
        if tensor.name in self.known:
            return self.known[tensor.name]
        return tensor.values if isinstance(tensor, gs.Constant) else self.value(tensor.name)

    def replace_input(self, node: gs.Node, index: int, values: np.ndarray) -> None:
        node.inputs[index] = self.constant(node.inputs[index].name, values)

    def take(self, node: gs.Node, index: int, keep: np.ndarray, axis: int) -> None:
        """Keep only indices `keep` along `axis` of a constant input; a quantized weight is sliced
        in its integer form, with its per-channel scale and zero point (quantized.py)."""
        chain = None if isinstance(node.inputs[index], gs.Constant) else chain_behind(node.inputs[index])
        if chain is None:
            self.replace_input(node, index, np.take(self.current(node, index), keep, axis))
            return
        kept = np.take(self.current(node, index), keep, axis)
        node.inputs[index] = sliced(chain, axis, keep, self)
        self.known[node.inputs[index].name] = kept

    def scale_along(self, node: gs.Node, index: int, columns: np.ndarray, factors: np.ndarray, axis: int,
                    exact_only: bool = False) -> bool:
        """Multiply indices `columns` along `axis` of a constant input by `factors`. A quantized
        weight takes them on its scale where that is exact, else (unless `exact_only`) is
        quantized again. Returns whether it was done."""
        values = self.current(node, index).copy()
        view = np.moveaxis(values, axis, 0)
        view[columns] *= factors.reshape((-1,) + (1,) * (view.ndim - 1)).astype(values.dtype)
        chain = None if isinstance(node.inputs[index], gs.Constant) else chain_behind(node.inputs[index])
        if chain is None:
            self.replace_input(node, index, values)
            return True
        exact = rescaled(chain, axis, columns, factors, self)
        if exact is None and exact_only:
            return False
        if exact is None:
            self.write(node, index, values)
        else:
            node.inputs[index], self.known[exact.name] = exact, values
        return True

    def write(self, node: gs.Node, index: int, values: np.ndarray) -> None:
        """Give a constant input new values; a quantized weight is quantized again with its scheme."""
        chain = None if isinstance(node.inputs[index], gs.Constant) else chain_behind(node.inputs[index])
        written = None if chain is None else requantized(chain, values, self)
        if written is None:
            self.replace_input(node, index, values)
            return
        node.inputs[index], self.known[written[0].name] = written

    # --- linear layers -------------------------------------------------------------------
    def keep_outputs(self, linear: Linear, columns: np.ndarray) -> None:
        """Keep only output features `columns` of `linear` (weight columns and bias entries)."""
        self.take(self.nodes[linear.node], linear.weight_index, columns, 0 if linear.transposed else 1)
        if linear.bias is not None:
            self.take(self.nodes[linear.bias_node], linear.bias_index, columns, -1)
        if linear.out_reshape is not None:
            self.set_entry(linear.out_reshape, -1, len(columns))

    def set_weights(self, linear: Linear, weight: np.ndarray, bias: np.ndarray | None) -> None:
        """Replace a projection's weight (given [in, out]) and bias, keeping their dtypes."""
        node = self.nodes[linear.node]
        dtype = self.current(node, linear.weight_index).dtype
        self.write(node, linear.weight_index, (weight.T if linear.transposed else weight).astype(dtype))
        if bias is not None and linear.bias is not None:
            bias_node = self.nodes[linear.bias_node]
            current = self.current(bias_node, linear.bias_index)
            self.write(bias_node, linear.bias_index, bias.reshape(current.shape).astype(current.dtype))

    def keep_inputs(self, linear: Linear, rows: np.ndarray, refit=None) -> None:
        """Keep only input features `rows` of `linear` (weight rows), or put in refitted weights."""
        if linear.in_reshape is not None:
            self.set_entry(linear.in_reshape, -1, len(rows))
        if refit is not None:
            self.set_weights(linear, refit.weight, refit.bias)
            return
        self.take(self.nodes[linear.node], linear.weight_index, rows, 1 if linear.transposed else 0)

    def keep_last_axis(self, node_name: str, index: int, keep: np.ndarray) -> None:
        """Slice the last axis of a constant node input (LayerNorm scale, position embedding, …)."""
        self.take(self.nodes[node_name], index, keep, -1)

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

    def set_entry(self, reshape: str, position: int, value: int) -> None:
        """Set entry `position` (counted from the end) of a Reshape's target shape to `value`."""
        node = self.nodes[reshape]
        shape = node.inputs[1]
        constant = shape.values if isinstance(shape, gs.Constant) else self.g.constant(shape.name)
        if constant is not None:
            changed = constant.copy()
            changed[position] = value
            node.inputs[1] = self.constant(shape.name, changed)
            return
        producer = shape.inputs[0] if shape.inputs else None
        if producer is not None and producer.op == "Concat":
            sizes = [self.g.shapes.get(piece.name) for piece in producer.inputs]
            if all(s is not None and len(s) == 1 and s[0] is not None for s in sizes):
                ends = np.cumsum([s[0] for s in sizes])
                index = int(ends[-1]) + position
                piece = int(np.searchsorted(ends, index, side="right"))
                if sizes[piece] == (1,):  # replace just that piece: the rest of the Concat is kept as is
                    out = self.variable(shape.name, np.int64)
                    inputs = list(producer.inputs)
                    inputs[piece] = self.constant(shape.name, np.array([value], dtype=np.int64))
                    self.add_node("Concat", inputs, [out], {"axis": 0})
                    node.inputs[1] = out
                    return
        # anything else: splice the entry in at run time
        parts = [self.slice(shape, 0, position), self.constant(shape.name, np.array([value], dtype=np.int64))]
        if position != -1:
            parts.append(self.slice(shape, position + 1, np.iinfo(np.int64).max))
        out = self.variable(shape.name, np.int64)
        self.add_node("Concat", parts, [out], {"axis": 0})
        node.inputs[1] = out

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


def rewrite(g: ModelGraph, plan: PrunePlan) -> onnx.ModelProto:
    """Return a new model with the plan applied; `g.model` is left as it was."""
    graph = gs.import_onnx(g.model)
    editor = _Editor(g, graph)
    for keep in plan.attention:
        if keep.changes_something():
            _prune_attention(editor, keep, plan.scale_values, plan.refits, plan.qk_scales)
        elif plan.stream is not None:  # merge reshapes that read the stream width now need a constant
            _pin_merge_widths(editor, keep)
    for ffn in plan.ffn:
        if ffn.changes_something():
            editor.keep_outputs(ffn.block.fc1, ffn.hidden)
            editor.keep_inputs(ffn.block.fc2, ffn.hidden, plan.refits.get(ffn.block.fc2.node))
    if plan.stream is not None:
        _prune_stream(editor, plan.stream, plan.stream_keep)
        for name, (scale, shift) in plan.norm_corrections.items():
            _correct_norm(editor, name, scale, shift)
    # last block first, so that a removed block's input is never a tensor already cut away
    for layer in reversed(plan.removed_layers):
        editor.bypass(layer.input, layer.output)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    del model.graph.value_info[:]  # shapes recorded by the exporter are stale where widths changed
    _keep_initializer_order(g.model, model)
    _rename_generated_initializers(model)
    _copy_metadata(g.model, model)
    return model


def _prune_attention(editor: _Editor, keep: AttentionKeep, scale_values: dict[str, np.ndarray],
                     refits: dict, qk_scales: dict[str, np.ndarray]) -> None:
    block = keep.block
    qk_columns = keep.qk_columns()
    v_columns = keep.v_columns()
    dq, dv, heads = keep.qk.shape[1], keep.v.shape[1], len(keep.heads)
    if block.attention_op is not None and dq != block.head_dim:
        # the op's default scale is 1/sqrt(q's head size): pin the original value
        editor.nodes[block.attention_op].attrs["scale"] = float(block.scale)
    for scale in block.frozen_scales if dq != block.head_dim else ():  # only Q/K width moves these
        editor.nodes[scale.node].inputs[scale.input_index] = editor.constant(scale.tensor, scale_values[scale.tensor])
    if block.form == "ort-attention":
        width = block.heads * block.head_dim
        editor.keep_outputs(block.q, np.concatenate([qk_columns, width + qk_columns, 2 * width + v_columns]))
        editor.nodes[block.attention_op].attrs["qkv_hidden_sizes"] = [len(qk_columns), len(qk_columns), len(v_columns)]
    elif block.fused is None:
        editor.keep_outputs(block.q, qk_columns)
        editor.keep_outputs(block.k, qk_columns)
        editor.keep_outputs(block.v, v_columns)
        if block.packed_bias is not None:  # MultiHeadAttention's [q | k | v] bias
            width = block.heads * block.head_dim
            bias = editor.value(block.packed_bias)
            kept = bias[np.concatenate([qk_columns, width + qk_columns, 2 * width + v_columns])]
            editor.nodes[block.attention_op].inputs[3] = editor.constant(block.packed_bias, kept)
    else:
        _prune_fused(editor, keep, qk_columns, v_columns, dq, dv)
    editor.keep_inputs(block.out, v_columns, refits.get(block.out.node))
    factors = np.asarray(qk_scales.get(block.name, np.ones((heads, dq))), dtype=np.float64)
    scales = block.frozen_scales + block.constant_scales
    if block.q_fixed is not None:
        qk_scales = {}
    elif dq != block.head_dim and block.attention_op is None and scales:
        # standard form where q can take sqrt(d'/d) exactly (a quantized q may not)
        if _scale_q(editor, keep, factors * math.sqrt(dq / block.head_dim), exact_only=True):
            _standard_scale(editor, scales[0], math.sqrt(block.head_dim / dq))
            qk_scales = {}
    if block.name in qk_scales:
        _scale_q(editor, keep, factors)
    if block.attention_op is not None:  # ops that carry the head count as an attribute
        attrs = editor.nodes[block.attention_op].attrs
        for name in ("num_heads", "q_num_heads", "kv_num_heads"):
            if name in attrs:
                attrs[name] = heads
    new_width = {"qk": dq, "v": dv, "qk_merged": heads * dq, "v_merged": heads * dv, "heads": heads}
    for edit in block.shape_edits:
        editor.set_entry(edit.reshape, edit.position, new_width[edit.width])


def _standard_scale(editor: _Editor, carrier, factor: float) -> None:
    """Keep the scores, but in the standard form for the new head width: the scale on the Q·Kᵀ
    path gets a factor sqrt(d/d') (the scales multiplied to 1/sqrt(d), now 1/sqrt(d')) while q
    gets sqrt(d'/d) (the caller), so q·k times the scale is what it was. A graph written this way
    stays right under tools that assume scale = 1/sqrt(head width) when they fuse attention (the
    onnxruntime transformers optimizer does, and would silently change the scores otherwise)."""
    node = editor.nodes[carrier.node]
    if carrier.attribute is not None:  # a scale attribute multiplies (FusedMatMul's alpha)
        node.attrs[carrier.attribute] = float(node.attrs[carrier.attribute]) * factor
        return
    current = node.inputs[carrier.input_index]
    value = current.values if isinstance(current, gs.Constant) else editor.value(carrier.tensor)
    moved = value * factor if node.op == "Mul" else value / factor
    node.inputs[carrier.input_index] = editor.constant(carrier.tensor, np.asarray(moved, dtype=value.dtype))


def _scale_q(editor: _Editor, keep: AttentionKeep, scales: np.ndarray, exact_only: bool = False) -> bool:
    """Multiply the kept q columns (weight and bias) by their factors; with `exact_only`, only
    where a quantized weight can take them exactly (else nothing is changed and False returned)."""
    block = keep.block
    factors = scales.reshape(-1)
    offset = 0  # where q's columns start in the (already sliced) weight
    if block.q.node == block.k.node:  # fused or packed: parts in their original order
        q_off = block.column_offsets[0]
        offset = sum(len(factors) if off == block.column_offsets[1] else len(keep.v_columns())
                     for off in block.column_offsets[1:] if off < q_off)
    columns = np.arange(offset, offset + len(factors))
    node = editor.nodes[block.q.node]
    if not editor.scale_along(node, block.q.weight_index, columns, factors, 0 if block.q.transposed else 1, exact_only):
        return False
    biases = [(block.q.bias_node, block.q.bias_index)] if block.q.bias is not None else []
    if block.packed_bias is not None:  # MultiHeadAttention: q is the first part of its bias input
        biases.append((block.attention_op, 3))
    for name, index in biases:
        editor.scale_along(editor.nodes[name], index, columns, factors, -1)
    return True


def _pin_merge_widths(editor: _Editor, keep: AttentionKeep) -> None:
    block = keep.block
    for edit in block.shape_edits:
        if edit.width == "v_merged":
            editor.set_entry(edit.reshape, edit.position, block.heads * block.head_dim)


def _prune_stream(editor: _Editor, stream: ResidualStream, keep: np.ndarray) -> None:
    """The same residual channels removed from every reader and writer of the stream."""
    for linear in stream.readers.values():
        editor.keep_inputs(linear, keep)
    for linear in stream.writers.values():
        editor.keep_outputs(linear, keep)
    for node, index in stream.sliced_inputs:
        editor.keep_last_axis(node, index, keep)
    for name in stream.convs:
        conv = editor.nodes[name]
        editor.take(conv, 1, keep, 0)
        if len(conv.inputs) > 2 and conv.inputs[2] is not None and conv.inputs[2].name:
            editor.take(conv, 2, keep, 0)
    for reshape in stream.channel_entries:
        editor.set_entry(reshape, -2, len(keep))


def _correct_norm(editor: _Editor, name: str, scale: float, shift: float) -> None:
    """γ' = γ·scale, β' = β + γ·shift (see compensation.py)."""
    node = editor.nodes[name]
    gamma = editor.current(node, 1)
    beta = editor.current(node, 2) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros_like(gamma)
    editor.write(node, 1, (gamma * scale).astype(gamma.dtype))
    new_beta = (beta + gamma * shift).astype(gamma.dtype)
    if len(node.inputs) > 2 and node.inputs[2].name:
        editor.write(node, 2, new_beta)
    else:
        node.inputs.append(editor.constant(f"{name}/bias", new_beta))


def _prune_fused(editor: _Editor, keep: AttentionKeep, qk_columns: np.ndarray, v_columns: np.ndarray,
                 dq: int, dv: int) -> None:
    """Slice the fused weight, then split it by width instead of by the (…, 3, H, d) reshape, which
    needs equal q/k/v widths: each piece is reshaped to (…, 1, H′, width), goes through the
    Transposes that followed the reshape, loses the 3-axis where the selector dropped it, and
    replaces the part the selector took. The old reshape and selectors become dead."""
    block = keep.block
    fused = block.fused
    assert fused is not None
    q_off, k_off, v_off = block.column_offsets
    roles = sorted([(q_off, qk_columns, dq, 0), (k_off, qk_columns, dq, 1), (v_off, v_columns, dv, 2)])
    columns = np.concatenate([offset + cols for offset, cols, _, _ in roles])
    editor.keep_outputs(block.q, columns)
    linear_out = editor.tensors[block.q.output]
    sizes = [len(cols) for _, cols, _, _ in roles]
    pieces = [editor.variable(f"{block.name}/qkv_part{i}") for i in range(3)]
    if editor.graph.opset >= 13:
        editor.add_node("Split", [linear_out, editor.constant("split", np.array(sizes, dtype=np.int64))], pieces,
                        {"axis": -1})
    else:
        editor.add_node("Split", [linear_out], pieces, {"axis": -1, "split": sizes})
    reshape = editor.nodes[fused.reshape]
    for piece, (_, _, width, part) in zip(pieces, roles):
        shape = editor.shape_with_tail(reshape.inputs[1], 3, [1, len(keep.heads), width])
        current = editor.variable(f"{block.name}/heads")
        editor.add_node("Reshape", [piece, shape], [current])
        for name in fused.replay:
            node = editor.nodes[name]
            moved = editor.variable(f"{block.name}/per_head")
            editor.add_node(node.op, [current] + list(node.inputs[1:]), [moved], dict(node.attrs))
            current = moved
        if fused.dropped[part]:
            current = editor.squeeze(current, fused.part_axis)
        editor.reroute(fused.parts[part], current)


def _keep_initializer_order(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """Initializers in their original order, new ones after: onnxruntime's extended optimizer
    (1.32) fails to load some graphs it saved itself once their initializers are reordered
    ("Attempt to replace the existing tensor"), as graphsurgeon's export does."""
    order = {t.name: index for index, t in enumerate(source.graph.initializer)}
    ranked = sorted(range(len(target.graph.initializer)),
                    key=lambda i: (order.get(target.graph.initializer[i].name, len(order)), i))
    if ranked != list(range(len(ranked))):
        initializers = [target.graph.initializer[i] for i in ranked]
        kept = onnx.GraphProto()
        kept.initializer.extend(initializers)
        del target.graph.initializer[:]
        target.graph.initializer.extend(kept.initializer)


# Names onnxruntime's optimizer generates (Graph::GenerateNodeArgName: base, base_token_N): it
# checks them against the graph's node args only, so when an earlier pass orphans an initializer
# of such a name, MatMulAddFusion can generate it again and fails to load the model ("Attempt to
# replace the existing tensor"). Pruning opens new passes on graphs onnxruntime saved itself.
_GENERATED = re.compile(r"(_token_\d+|^gemm_(input|output)_shape)$")


def _rename_generated_initializers(model: onnx.ModelProto) -> None:
    renamed = {t.name: f"{t.name}__snp" for t in model.graph.initializer if _GENERATED.search(t.name)}
    if not renamed:
        return
    for tensor in model.graph.initializer:
        tensor.name = renamed.get(tensor.name, tensor.name)
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in renamed:
                node.input[index] = renamed[name]


def _copy_metadata(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    target.ir_version = source.ir_version
    del target.opset_import[:]
    target.opset_import.extend(source.opset_import)
    target.producer_name = source.producer_name
    target.producer_version = source.producer_version
    target.domain = source.domain
    target.model_version = source.model_version
    target.doc_string = source.doc_string
    del target.metadata_props[:]
    target.metadata_props.extend(source.metadata_props)
    target.metadata_props.add(key="onnxsnp", value="pruned with onnxsnp (structured neuron-level pruning)")
