"""What the rewrite does beyond the cut for decoders: the rotary embeddings' cos/sin tables
sliced to the dims every head keeps, and the KV cache inputs and outputs declared with the new
head widths (the cut itself already made the present tensors narrower)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .editor import Editor
from ..match.blocks import Part, Rotary, RotaryStyle, Width
from ..plan import AttentionKeep, PrunePlan


def slice_rotary_tables(editor: Editor, keep: AttentionKeep, rotaries: tuple[Rotary, ...]) -> None:
    """Every kept Q/K dim keeps its own angle: an op's caches (one column per pair, the same pairs
    in every head) are gathered to the kept pairs' columns — from the one cache all layers share,
    by a Gather of constants the runtime folds when it loads the model, so the file keeps one
    cache rather than a sliced copy per layer (60 copies grew a 86 MB int4 folder by 47 MB), or
    from a RotaryEmbedding op's per-token caches at run time (a Gather a table and step); a
    written-out embedding's tables (one column per dim, broadcast over the heads) are gathered
    per head, to (…, kept heads, …, kept dims): all tables of the layer's q and k at once."""
    block = keep.block
    per_head: list[tuple[gs.Node, int, np.ndarray, int]] = []
    for rotary in rotaries:
        positions = keep.qk if rotary.heads == block.groups else np.repeat(keep.qk, block.group_size, axis=0)
        if rotary.shared:
            row = positions[0]
            pairs = row[0::2] // 2 if rotary.style is RotaryStyle.INTERLEAVED else row[row < block.head_dim // 2]
            for name, index in rotary.tables:
                node = editor.nodes[name]
                node.inputs[index] = _gathered(editor, node.inputs[index], pairs, "rotary_pairs")
            continue
        if rotary.rotated:  # a partial embedding's tables hold the rotated dims only (one split for all heads)
            positions = positions[:, positions[0] < rotary.rotated]
        for name, index in rotary.tables:
            node = editor.nodes[name]
            if (positions == positions[:1]).all():  # every head the same dims: no heads axis needed
                node.inputs[index] = _gathered(editor, node.inputs[index], positions[0], "rotary_dims")
            else:
                per_head.append((node, index, positions, rotary.heads_axis))
    _per_head_tables(editor, per_head)


def rotated_sizes(keep: AttentionKeep) -> dict[Width, int]:
    """A partial rotary embedding's split points after the cut: the kept dims below r (the same
    in every head, match/partial_rotary.py) and half of them."""
    rotated = {r.rotated for r in keep.block.rotary if r.rotated}
    if not rotated:
        return {}
    counts = set((keep.qk < rotated.pop()).sum(axis=1).tolist())
    if len(counts) != 1:  # the block's pairs_shared makes every selection keep the same dims
        raise ValueError(f"{keep.block.name}: heads keep different rotated widths {sorted(counts)}; one split point serves all")
    kept = counts.pop()
    return {Width.QK_ROTATED: kept, Width.QK_ROTATED_HALF: kept // 2}


def _gathered(editor: Editor, table: gs.Tensor, columns: np.ndarray, base: str) -> gs.Tensor:
    """The table's last axis gathered to `columns`, made once per table and columns."""
    key = (table.name, tuple(int(c) for c in columns))
    if key not in editor.gathered:
        indices = editor.constant(base, np.asarray(columns, dtype=np.int64))
        editor.gathered[key] = _node(editor, "Gather", [table, indices], {"axis": -1}, table)
    return editor.gathered[key]


def _per_head_tables(editor: Editor, wanted: list[tuple[gs.Node, int, np.ndarray, int]]) -> None:
    """Each (reader, input, positions, heads axis) gets its table with a heads axis, (…, heads, …,
    dims). A layer's tables (cos and sin; q's and k's unless their heads match) come out of one
    Gather of whole rows from the tables side by side with their dims axis moved to where the
    heads go (made once for all layers), one Transpose that moves the dims axis alone to the end,
    and a Split into the tables: 3 nodes a layer instead of a Gather and a Transpose per table —
    each node costs a fixed time on every decode step (issue 28). A Gather along the last axis
    copies element by element instead, and a Transpose that moves several axes has no fast path:
    in a 128-token prefill of SmolLM2's shape (30 layers) onnxruntime took 50–70 ms for the
    former and 20 ms for row Gathers and such Transposes, 1.5 ms for this (docs/DECODER_SPEED.md)."""
    requests: dict[tuple, tuple[gs.Tensor, np.ndarray, int]] = {}
    for node, index, positions, axis in wanted:
        table = node.inputs[index]
        requests.setdefault((table.name, axis, positions.shape, positions.tobytes()), (table, positions, axis))
    todo = {key: request for key, request in requests.items() if key not in editor.gathered}
    tables = list({table.name: table for table, _, _ in todo.values()}.values())
    shapes = {tuple(editor.g.shapes.get(table.name) or ()) for table in tables}
    together = len(todo) > 1 and len(shapes) == 1 and len({axis for _, _, axis in todo.values()}) == 1 \
        and len({positions.shape[1] for _, positions, _ in todo.values()}) == 1
    width = next(iter(shapes))[-1] if together and next(iter(shapes)) else None
    if together and isinstance(width, int):
        heads_axis = next(iter(todo.values()))[2]
        rank = len(next(iter(shapes)))
        at = max(rank, -heads_axis) + heads_axis  # where the heads axis goes
        offset = {table.name: i * width for i, table in enumerate(tables)}  # the tables side by side
        rows = np.concatenate([positions + offset[table.name] for table, positions, _ in todo.values()])
        gathered = _node(editor, "Gather", [_dims_at(editor, tables, rank, heads_axis, at),
                                            editor.constant("rotary_dims", rows.astype(np.int64))],
                         {"axis": at}, tables[0])  # (…, heads, dims, …)
        moved = _dims_last(editor, gathered, max(rank, -heads_axis), at, tables[0])
        parts = [editor.variable(table.name, table.dtype) for table, _, _ in todo.values()]
        sizes = np.array([len(positions) for _, positions, _ in todo.values()], dtype=np.int64)
        if editor.graph.opset >= 13:
            editor.add_node("Split", [moved, editor.constant("split", sizes)], parts, {"axis": at})
        else:
            editor.add_node("Split", [moved], parts, {"axis": at, "split": sizes.tolist()})
        editor.gathered.update(zip(todo, parts))
    else:
        for key, (table, positions, axis) in todo.items():
            rank = len(editor.g.shapes.get(table.name) or ())
            at = max(rank, -axis) + axis
            rows = _node(editor, "Gather", [_dims_at(editor, [table], rank, axis, at),
                                            editor.constant("rotary_dims", positions.astype(np.int64))],
                         {"axis": at}, table)
            editor.gathered[key] = _dims_last(editor, rows, max(rank, -axis), at, table)
    for node, index, positions, axis in wanted:
        node.inputs[index] = editor.gathered[(node.inputs[index].name, axis, positions.shape, positions.tobytes())]


def _dims_last(editor: Editor, rows: gs.Tensor, rank: int, at: int, like: gs.Tensor) -> gs.Tensor:
    """(…, heads, dims, …) → (…, heads, …, dims): a Transpose that moves one axis, onnxruntime's fast path."""
    perm = [axis for axis in range(rank) if axis != at + 1] + [at + 1]
    return _node(editor, "Transpose", [rows], {"perm": perm}, like)


def _dims_at(editor: Editor, tables: list[gs.Tensor], rank: int, heads_axis: int, at: int) -> gs.Tensor:
    """The tables side by side along their last (dims) axis, without the size-1 axis they
    broadcast over the heads with, that dims axis moved to `at`: shared by every layer that
    gathers from them."""
    key = (tuple(table.name for table in tables), heads_axis, "dims at the heads")
    if key not in editor.gathered:
        joined = tables[0]
        if len(tables) > 1:
            joined = _node(editor, "Concat", list(tables), {"axis": -1}, tables[0])
        kept = rank
        if rank >= -heads_axis:  # drop the broadcast axis: the gathered heads take its place
            axes = np.array([rank + heads_axis], dtype=np.int64)
            joined = _node(editor, "Squeeze", [joined, editor.constant("axes", axes)], {}, tables[0])
            kept = rank - 1
        perm = list(range(kept - 1))
        perm.insert(at, kept - 1)
        editor.gathered[key] = _node(editor, "Transpose", [joined], {"perm": perm}, tables[0])
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
            width = keep.qk.shape[1] if cache.part is Part.KEY else keep.v.shape[1]
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
            total += heads * (qk if cache.part is Part.KEY else v) * size
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
