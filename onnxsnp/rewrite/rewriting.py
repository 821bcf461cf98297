"""Stage 6: apply a prune plan to the model.

The plan becomes cuts of dependency groups (matching/groups.py) — Q/K pairs and V neurons of
each attention, FFN hidden neurons, residual channels — which `Editor.cut` slices in one
generic pass; refitted layers get their new weights first. What is not a cut follows: the
attention scales (frozen, pinned, put in standard form), a fused projection split by width,
the Q/K rescale, the LayerNorm correction, removed blocks bypassed. Dead nodes and
initializers are dropped by graphsurgeon's cleanup at the end.
"""
from __future__ import annotations

import math
import re

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from .decoding import kv_cache_shapes, rotated_sizes, set_kv_cache_shapes, slice_rotary_tables
from .editor import Editor
from .lazy import FromFile, OnnxExporter, SparseValues, onnx_type
from ..ir import external
from ..ir.graph import ModelGraph
from ..compensate.masking import mapped_columns
from ..compensate.qk_norm import cuts_within, gains
from ..plan import AttentionKeep, PrunePlan
from ..match import Width
from ..match.groups import Cut, attention_groups, ffn_group
from ..match.residual import stream_group


def rewrite(g: ModelGraph, plan: PrunePlan, spill: external.Spill | None = None) -> onnx.ModelProto:
    """Return a new model with the plan applied; `g.model` is left as it was. With `spill`, its
    larger new weights go to that file as the editor makes them (lazy.py), and the ones it keeps unchanged from
    a lazily loaded input stay in the input's file: a model of lazy stubs (external.py), for the
    caller to make whole."""
    graph = gs.import_onnx(g.model)
    _read_lazily(graph)
    editor = Editor(g, graph, spill)
    changed = [keep for keep in plan.attention if keep.changes_something()]
    for keep in changed:
        _freeze_scales(editor, keep, plan.scale_values)
        for column in mapped_columns(g, keep):  # mapped positions first, then everything is sliced
            node = editor.nodes[column.slot[0]]
            values = editor.current(node, column.slot[1]).copy()
            index = [slice(None)] * values.ndim
            index[column.axis] = column.positions
            values[tuple(index)] = column.values.astype(values.dtype)
            editor.write(node, column.slot[1], values)
    editor.cut(plan_cuts(g, plan), _refit(editor, plan))
    for keep in changed:
        _finish_attention(editor, keep)
    for name, (scale, shift) in plan.norm_corrections.items():
        _correct_norm(editor, name, scale, shift)
    kv_shapes = kv_cache_shapes(plan)
    # last block first, so that a removed block's input is never a tensor already cut away
    for layer in reversed(plan.removed_layers):
        editor.bypass(layer.input, layer.output)
        if layer.renorm:
            _renormalize(editor, layer.renorm, layer.input)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = _export(graph, spill)
    if spill is None:
        external.materialize(model)  # the input's weights still in its data file, now copied in: a whole model
    del model.graph.value_info[:]  # shapes recorded by the exporter are stale where widths changed
    _keep_initializer_order(g.model, model)
    _keep_io_types(g.model, model)
    set_kv_cache_shapes(model, kv_shapes)
    _rename_generated_initializers(model)
    _copy_metadata(g.model, model)
    return model


def _read_lazily(graph: gs.Graph) -> None:
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and type(tensor._values) is LazyValues and \
                external.is_lazy(tensor._values.tensor):
            tensor._values = FromFile(tensor._values.tensor)
            # decoded and exported again, a constant would otherwise be marked external with its
            # bytes in the protobuf (the exporter copies the import's data location); DEFAULT, as
            # the import of the whole model (onnx's loader sets it) leaves it: the same bytes
            tensor.data_location = onnx.TensorProto.DEFAULT


def _export(graph: gs.Graph, spill: external.Spill | None = None) -> onnx.ModelProto:
    """gs.export_onnx with every weight copied into the model once. The exporter puts each
    initializer's TensorProto in a GraphProto (a copy) that make_model copies into the model (a
    second): every weight held three times at once and copied twice, 2.3 GB of page faults on a
    270 MB decoder (docs/PRUNE_COST_DECODER.md). Here the graph is exported with data-less stand-ins
    (name, type, dims) and each initializer then copied from the exporter's own TensorProto of that
    constant, one at a time: the same bytes. With `spill`, each larger one goes to its file instead
    (rewrite)."""
    if OnnxExporter is None:
        return gs.export_onnx(graph, do_type_check=False)
    constants = {name: tensor for name, tensor in graph.tensors().items()
                 if isinstance(tensor, gs.Constant) and not isinstance(tensor._values, SparseValues)}
    values = {name: tensor._values for name, tensor in constants.items()}
    try:
        for name, tensor in constants.items():
            full = values[name]
            source = full.tensor if isinstance(full, LazyValues) else None
            stub = onnx.TensorProto(name=name, data_type=source.data_type if source is not None else
                                    onnx_type(tensor))
            stub.dims.extend(tensor.shape)
            tensor._values = LazyValues(stub)
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for name, tensor in constants.items():
            tensor._values = values[name]
    for initializer in model.graph.initializer:
        tensor = constants.get(initializer.name)
        if tensor is not None:
            exported = OnnxExporter.export_tensor_proto(tensor)
            initializer.CopyFrom(spill.put(exported) if spill is not None else exported)
            del exported
    return model


def plan_cuts(g: ModelGraph, plan: PrunePlan) -> list[Cut]:
    """The plan as cuts of dependency groups. An unchanged attention is cut too (keeping every
    unit) when the residual stream is: its merge reshapes may read the stream width at run
    time, and must keep the attention's own."""
    cuts = []
    for keep in plan.attention:
        if keep.changes_something() or plan.stream is not None:
            dq, dv, groups = keep.qk.shape[1], keep.v.shape[1], len(keep.heads)
            heads = groups * keep.block.group_size
            sizes = {Width.QK: dq, Width.V: dv, Width.QK_MERGED: heads * dq, Width.V_MERGED: heads * dv,
                     Width.HEADS: heads, Width.FUSED: heads * dq + groups * (dq + dv), Width.KV_HEADS: groups,
                     Width.KV_QK_MERGED: groups * dq, Width.KV_V_MERGED: groups * dv, Width.QK_HALF: dq // 2,
                     Width.QK_THEN_KV: (heads + groups) * dq, **rotated_sizes(keep)}
            qk, v = attention_groups(g, keep.block)
            cuts += [Cut(qk, keep.qk_columns(), sizes), Cut(v, keep.v_columns(), sizes)]
    cuts += [Cut(ffn_group(keep.block), keep.hidden, {Width.FFN: len(keep.hidden)})
             for keep in plan.ffn if keep.changes_something()]
    if plan.stream is not None:
        cuts.append(Cut(stream_group(g, plan.stream), plan.stream_keep, {Width.CHANNELS: len(plan.stream_keep)}))
    return cuts


def _refit(editor: Editor, plan: PrunePlan) -> frozenset[tuple[str, int, int]]:
    """New weights for the refitted layers (compensation.py); returns their input axes, written."""
    linears = [keep.block.out for keep in plan.attention if keep.changes_something()]
    linears += [keep.block.fc2 for keep in plan.ffn if keep.changes_something()]
    done = set()
    for linear in linears:
        refit = plan.refits.get(linear.node)
        if refit is not None:
            editor.set_weights(linear, refit.weight, refit.bias, refit.gram)
            done.add((linear.node, linear.weight_index, 1 if linear.transposed else 0))
    return frozenset(done)


def _freeze_scales(editor: Editor, keep: AttentionKeep, scale_values: dict[str, np.ndarray]) -> None:
    """Only the Q/K width moves the scores' scale: a run-time one is frozen to its value, and an
    op whose default scale is 1/sqrt(q's head size) gets the original pinned."""
    block = keep.block
    if keep.qk.shape[1] == block.head_dim:
        return
    if block.attention_op is not None:
        editor.nodes[block.attention_op].attrs["scale"] = float(block.scale)
    for scale in block.frozen_scales:
        editor.nodes[scale.node].inputs[scale.input_index] = editor.constant(scale.tensor, scale_values[scale.tensor])


def _finish_attention(editor: Editor, keep: AttentionKeep) -> None:
    """After the cut: a fused projection split by width; the scale in standard form for the new
    head width (where q can take the factor exactly)."""
    block = keep.block
    dq, dv, heads = keep.qk.shape[1], keep.v.shape[1], len(keep.query_heads())
    if block.fused is not None:
        _split_fused(editor, keep, dq, dv)
    slice_rotary_tables(editor, keep, tuple(block.rotary))
    scales = block.frozen_scales + block.constant_scales
    if cuts_within(keep):  # a per-head QK-norm: γ per head carries the rescale (and the standard form's factor)
        standard = block.attention_op is None and bool(scales)
        for (name, index), value in gains(editor.g, keep, zeroed=False,
                                          q_factor=math.sqrt(dq / block.head_dim) if standard else 1.0):
            editor.write(editor.nodes[name], index, value)
        if standard:
            _standard_scale(editor, scales[0], math.sqrt(block.head_dim / dq))
    elif block.q_fixed is None and dq != block.head_dim and block.attention_op is None and scales:
        # standard form where q can take sqrt(d'/d) exactly (a quantized q may not)
        if _scale_q(editor, keep, np.full((heads, dq), math.sqrt(dq / block.head_dim)), exact_only=True):
            _standard_scale(editor, scales[0], math.sqrt(block.head_dim / dq))


def _renormalize(editor: Editor, skip_norm: str, stream: str) -> None:
    """A removed pre-norm block's last join also normalised the stream for the next block: that
    norm now reads the block's input (a LayerNormalization with the join's γ, β and ε)."""
    node = editor.nodes[skip_norm]
    simplified = node.op == "SkipSimplifiedLayerNormalization"
    inputs = [editor.tensors[stream], node.inputs[2]] + ([] if simplified else [node.inputs[3]])
    normalized = editor.variable(f"{skip_norm}/renormalized", node.outputs[0].dtype)
    attrs = {"axis": -1, "epsilon": float(node.attrs.get("epsilon", 1e-5))}
    op = "SimplifiedLayerNormalization" if simplified else "LayerNormalization"
    editor.add_node(op, inputs, [normalized], attrs)
    editor.reroute(node.outputs[0].name, normalized)


def _standard_scale(editor: Editor, carrier, factor: float) -> None:
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


def _scale_q(editor: Editor, keep: AttentionKeep, scales: np.ndarray, exact_only: bool = False) -> bool:
    """Multiply the kept q columns (weight and bias) by their factors; with `exact_only`, only
    where a quantized weight can take them exactly (else nothing is changed and False returned)."""
    block = keep.block
    factors = scales.reshape(-1)
    offset = 0  # where q's columns start in the (already sliced) weight
    if block.q.node == block.k.node:  # fused or packed: parts in their original order
        q_off = block.column_offsets[0]
        offset = sum(len(keep.qk_columns()) if off == block.column_offsets[1] else len(keep.v_columns())
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


def _correct_norm(editor: Editor, name: str, scale: float, shift: float) -> None:
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


def _split_fused(editor: Editor, keep: AttentionKeep, dq: int, dv: int) -> None:
    """Split the (already cut) fused projection by width instead of by the (…, 3, H, d) reshape,
    which needs equal q/k/v widths: each piece is reshaped to (…, 1, H′, width), goes through the
    Transposes that followed the reshape, loses the 3-axis where the selector dropped it, and
    replaces the part the selector took. The old reshape and selectors become dead."""
    block = keep.block
    fused = block.fused
    assert fused is not None
    q_off, k_off, v_off = block.column_offsets
    roles = sorted([(q_off, len(keep.qk_columns()), dq, 0), (k_off, len(keep.qk_columns()), dq, 1),
                    (v_off, len(keep.v_columns()), dv, 2)])
    linear_out = editor.tensors[block.q.output]
    sizes = [count for _, count, _, _ in roles]
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


def _keep_io_types(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """Graph inputs and outputs keep their declared types and shapes (pruning never changes them;
    graphsurgeon drops the shape of an output that a Cast writes, as fp16 graphs end)."""
    declared = {info.name: info.type for info in list(source.graph.input) + list(source.graph.output)}
    for info in list(target.graph.input) + list(target.graph.output):
        if info.name in declared:
            info.type.CopyFrom(declared[info.name])


def _keep_initializer_order(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """Initializers in their original order, new ones after: onnxruntime's extended optimizer
    (1.32) fails to load some graphs it saved itself once their initializers are reordered
    ("Attempt to replace the existing tensor"), as graphsurgeon's export does."""
    order = {t.name: index for index, t in enumerate(source.graph.initializer)}
    now = {t.name: index for index, t in enumerate(target.graph.initializer)}  # ties (new ones): as they are
    # sorted in place: copied out and back, every weight was held twice by the model's protobuf
    # arena (whose freed parts stay until it goes: SmolLM2-135M 0.41 GB more for the rest of the
    # run) and copied twice (2.2 s of a 270 MB decoder's prune)
    target.graph.initializer.sort(key=lambda t: (order.get(t.name, len(order)), now[t.name]))


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
