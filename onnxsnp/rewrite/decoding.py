"""What the rewrite does beyond the cut for decoders: the rotary embeddings' cos/sin tables
sliced to the dims every head keeps, and the KV cache inputs and outputs declared with the new
head widths (the cut itself already made the present tensors narrower)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..ir.editor import Editor
from ..match.blocks import Rotary, RotaryStyle
from ..plan import AttentionKeep, PrunePlan


def slice_rotary_tables(editor: Editor, keep: AttentionKeep, rotary: Rotary) -> None:
    """Every kept Q/K dim keeps its own angle: an op's caches (one column per pair, the same pairs
    in every head) are gathered to the kept pairs' columns — from the one cache all layers share,
    by a Gather of constants the runtime folds when it loads the model, so the file keeps one
    cache rather than a sliced copy per layer (60 copies grew a 86 MB int4 folder by 47 MB); a
    written-out embedding's tables (one column per dim, broadcast over the heads) are gathered
    per head, to (…, kept heads, …, kept dims)."""
    block = keep.block
    positions = keep.qk if rotary.heads == block.groups else np.repeat(keep.qk, block.group_size, axis=0)
    if rotary.shared:
        row = positions[0]
        pairs = row[0::2] // 2 if rotary.style is RotaryStyle.INTERLEAVED else row[row < block.head_dim // 2]
        for name, index in rotary.tables:
            node = editor.nodes[name]
            table = node.inputs[index]
            key = (table.name, tuple(int(p) for p in pairs))
            if key not in editor.gathered:
                columns = editor.constant("rotary_pairs", np.asarray(pairs, dtype=np.int64))
                editor.gathered[key] = _node(editor, "Gather", [table, columns], {"axis": -1}, table)
            node.inputs[index] = editor.gathered[key]
        return
    for name, index in rotary.tables:
        node = editor.nodes[name]
        node.inputs[index] = _per_head(editor, node.inputs[index], positions, rotary.heads_axis)


def _per_head(editor: Editor, table: gs.Tensor, positions: np.ndarray, heads_axis: int) -> gs.Tensor:
    """The table's last axis gathered to `positions` (kept heads, kept dims), made once per table
    and positions (q and k of a layer share it where they keep the same dims): one Gather where
    every head keeps the same dims, else a table with its own heads axis, (…, kept heads, …, kept dims)."""
    key = (table.name, heads_axis, positions.shape, positions.tobytes())
    if key not in editor.gathered:
        if (positions == positions[:1]).all():
            editor.gathered[key] = _node(editor, "Gather", [table, editor.constant(
                "rotary_dims", positions[0].astype(np.int64))], {"axis": -1}, table)
        else:
            editor.gathered[key] = _heads_table(editor, table, positions, heads_axis)
    return editor.gathered[key]


def _heads_table(editor: Editor, table: gs.Tensor, positions: np.ndarray, heads_axis: int) -> gs.Tensor:
    """(…, heads, …, dims) from a table broadcast over the heads: a Gather of whole rows from the
    table with its dims axis moved to where the heads go (made once for all layers), to (…,
    heads, dims, …), then a Transpose that moves the dims axis alone to the end. A Gather along the
    last axis copies element by element instead, and a Transpose that moves several axes has no
    fast path: in a 128-token prefill of SmolLM2's shape (30 layers) onnxruntime took 50–70 ms for
    the former and 20 ms for the latter's row Gathers and Transposes, 1.5 ms for this
    (docs/DECODER_SPEED.md)."""
    rank = len(editor.g.shapes.get(table.name) or ())
    out_rank = max(rank, -heads_axis)
    at = out_rank + heads_axis  # where the heads axis goes
    rows = _node(editor, "Gather", [_dims_at(editor, table, rank, heads_axis, at),
                                    editor.constant("rotary_dims", positions.astype(np.int64))],
                 {"axis": at}, table)  # (…, heads, dims, …)
    perm = [axis for axis in range(out_rank) if axis != at + 1] + [at + 1]
    return _node(editor, "Transpose", [rows], {"perm": perm}, table)


def _dims_at(editor: Editor, table: gs.Tensor, rank: int, heads_axis: int, at: int) -> gs.Tensor:
    """The table without the size-1 axis it broadcast over the heads with, its last (dims) axis
    moved to `at`: shared by every layer that gathers from it."""
    key = (table.name, heads_axis, "dims at the heads")
    if key not in editor.gathered:
        squeezed, kept = table, rank
        if rank >= -heads_axis:  # drop the broadcast axis: the gathered heads take its place
            axes = np.array([rank + heads_axis], dtype=np.int64)
            squeezed = _node(editor, "Squeeze", [table, editor.constant("axes", axes)], {}, table)
            kept = rank - 1
        perm = list(range(kept - 1))
        perm.insert(at, kept - 1)
        editor.gathered[key] = _node(editor, "Transpose", [squeezed], {"perm": perm}, table)
    return editor.gathered[key]


def _node(editor: Editor, op: str, inputs: list, attrs: dict, like: gs.Tensor) -> gs.Variable:
    out = editor.variable(like.name, like.dtype)
    editor.add_node(op, inputs, [out], attrs)
    return out


def kv_cache_shapes(plan: PrunePlan) -> dict[str, dict[int, int]]:
    """The new sizes of the KV cache inputs' and outputs' head and head-dim axes (from the end)."""
    shapes: dict[str, dict[int, int]] = {}
    for keep in plan.attention:  # unchanged ones too: a symbolic head size (onnxruntime-genai's) is resolved
        for cache in keep.block.kv_caches:
            width = keep.qk.shape[1] if cache.part == "key" else keep.v.shape[1]
            sizes = {cache.heads_axis: len(keep.heads), cache.dim_axis: width}
            for name in (cache.past, cache.present):
                if name:
                    shapes[name] = sizes
    return shapes


def kv_cache_bytes(g, widths: list[tuple]) -> int:
    """Bytes a KV cache holds per token: for each (block, key/value heads, Q/K width, V width),
    its caches' heads × width × the element size of the present output."""
    types = {o.name: o.type.tensor_type.elem_type for o in g.model.graph.output}
    total = 0
    for block, heads, qk, v in widths:
        for cache in block.kv_caches:
            size = onnx.helper.tensor_dtype_to_np_dtype(types.get(cache.present, onnx.TensorProto.FLOAT)).itemsize
            total += heads * (qk if cache.part == "key" else v) * size
    return total


def set_kv_cache_shapes(model: onnx.ModelProto, shapes: dict[str, dict[int, int]]) -> None:
    for info in list(model.graph.input) + list(model.graph.output):
        sizes = shapes.get(info.name)
        if sizes is None or not info.type.tensor_type.HasField("shape"):
            continue
        dims = info.type.tensor_type.shape.dim
        for axis, size in sizes.items():
            dims[len(dims) + axis].dim_value = size  # clears a symbolic name


def expose_stream_sums(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (in place) with every SkipSimplifiedLayerNormalization writing the sum it
    normalises (its optional output 3): a decoder's final norm joins the last block's FFN without
    writing it, and without that tensor the last block cannot be cut out for the block-by-block
    reconstruction. The extra output costs nothing and stays unread."""
    for node in model.graph.node:
        if node.op_type == "SkipSimplifiedLayerNormalization" and (len(node.output) < 4 or not node.output[3]):
            while len(node.output) < 4:
                node.output.append("")
            node.output[3] = f"{node.name or node.output[0]}/input_skip_bias_sum"
    return model
