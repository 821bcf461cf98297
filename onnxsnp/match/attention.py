"""From an attention core (what a rule found) to an `AttentionBlock`: Q, K and V traced back to
their projections and attn·V forward to the output projection (`tracing.py`), the head layout
read, and every tensor whose width changes checked to be private to the block."""
from __future__ import annotations

from dataclasses import dataclass, replace

import onnx

from ..ir.graph import ModelGraph, attribute
from .blocks import (AttentionBlock, AttentionForm, Candidate, FrozenScale, FusedQkv, KvCache, Linear, NoMatch, Part,
                     QkNorm, Rotary, ShapeEdit, Skipped, Width, block_name)
from .decoder import check_kv_axis
from .partial_rotary import SHARED as PARTIAL_SHARED
from .layout import FUSED, MERGED, SPLIT, Axes, Path, path_shape_edits
from .qk_norm import qk_norm_parts
from .shapes import head_layout, shape_entries, shape_source
from .tracing import Trace, forward_to_linear, trace_to_linear

QKV = (Part.QUERY, Part.KEY, Part.VALUE)


@dataclass(frozen=True)
class AttentionCore:
    """What an attention rule reads out of the graph: where Q, K and V enter the core and where its
    output leaves. The rest (projections, head layout, shape edits) is found the same way for
    every rule. Frozen like the blocks, though not hashable: it holds the anchor node."""

    anchor: onnx.NodeProto
    q: str
    k: str  # K or Kᵀ: the path tracking follows whichever layout the graph uses
    v: str
    output: str  # attn·V, heads split (…, N, d), or merged where `heads` is given
    frozen: tuple[FrozenScale, ...] = ()  # scales between Q·Kᵀ and the softmax
    nodes: frozenset[str] = frozenset()  # the core's own nodes (scores, softmax, attn·V)
    products: tuple[str, str] = ("", "")  # the Q·Kᵀ and attn·V nodes (an attention op: itself twice)
    heads: int | None = None  # given by an op that takes and gives merged heads (…, N, H·d)
    op: str | None = None  # an attention op whose scale (and head-count attributes) the rewrite sets
    scale: float | None = None  # that op's scale attribute, if it has one
    packed: Linear | None = None  # a [D, 3·H·d] q|k|v projection held inside the op
    packed_bias: str | None = None  # a [q | k | v] bias input of the op
    form: AttentionForm | None = None  # the block's form where it is the op's own
    kv_heads: int | None = None  # an op with grouped-query attention: its key/value heads
    kv_caches: tuple[KvCache, ...] = ()  # an op's own past inputs and present outputs
    rotary: Rotary | None = None  # an op's own rotary embedding
    region: tuple[str, ...] = ()  # more tensors whose width the cut changes (a packed projection's output)
    softcap: float | None = None  # the scores soft-capped before the softmax (Gemma 2)


def assemble(g: ModelGraph, core: AttentionCore) -> AttentionBlock:
    """The block around a core; NoMatch where any part of it cannot be pruned safely. The
    projections give its head layout (`_packed_block`, `_fused_block`, `_separate_block`); what
    the steps after find is added to it in one `replace` at the end."""
    traces: tuple[Trace, ...] = ()
    if core.packed is None:
        traces = tuple(trace_to_linear(g, t, part) for t, part in zip((core.q, core.k, core.v), QKV))
    out, merge_path = forward_to_linear(g, core.output)
    if core.packed is not None:
        block = _packed_block(core, out)
        region = {core.output, *core.region}
    else:
        q_trace, k_trace, v_trace = traces
        if any(not scale.constant for scale in v_trace.scales):
            raise NoMatch("V is scaled by a run-time value")
        name = block_name(core.anchor.name, (q_trace.linear, out))
        if q_trace.linear.node == k_trace.linear.node == v_trace.linear.node:
            block = _fused_block(g, name, core.anchor, q_trace, k_trace, v_trace, out)
        elif len({q_trace.linear.node, k_trace.linear.node, v_trace.linear.node}) == 3:
            block = _separate_block(g, name, core, q_trace, k_trace, v_trace, out)
        else:
            raise NoMatch("Q, K and V share some but not all projections")
        region = _region_tensors(q_trace, k_trace, v_trace, core)
    if out.in_features != block.heads * block.head_dim:
        raise NoMatch(f"output projection reads {out.in_features} features, attention gives "
                      f"{block.heads}×{block.head_dim}")
    region |= {t for node in merge_path for t in node.output}
    seen, edits, heads_lost = _shape_edits(g, block, traces, merge_path, region, core)
    rotary, caches, rotary_edits = _decoder_parts(g, block, traces, seen, core)
    qk_norms, norm_fixed, qk_whole, qk_norm = _qk_norms(g, traces, seen, block.head_dim)
    _check_private(g, region, core, traces, merge_path, out, seen, rotary, caches)
    scales = list(core.frozen) + [scale for trace in traces[:2] for scale in trace.scales]
    frozen = tuple(scale for scale in scales if not scale.constant)
    for scale in frozen:
        _check_frozen_scale(g, scale, region, block.head_dim)
    quantized = [n.name for n in (traces[0].nodes if traces else []) if n.op_type == "QuantizeLinear"]
    scale = None  # an attention op's softmax scale, pinned when the Q/K width changes
    if core.op is not None:
        scale = core.scale if core.scale is not None else block.head_dim ** -0.5
    gqa = core.form is AttentionForm.ORT_GQA  # one head size for Q, K and V; the rotary cache shared by all heads
    shared = gqa and core.rotary is not None
    own = len(rotary) == 2 and all(r.output for r in rotary)  # rotated q and k are tensors of the graph
    # a RotaryEmbedding op (ONNX's, or com.microsoft's) whose caches hold one column per pair
    op_rotary = next((r.node for r in rotary if r.per_token or r.shared and r.node != core.anchor.name), None)
    return replace(
        block, form=core.form if core.form is not None else block.form,
        shape_edits=block.shape_edits + tuple(edits) + tuple(rotary_edits), frozen_scales=frozen,
        constant_scales=tuple(s for s in scales if s.constant), attention_op=core.op, scale=scale,
        packed_bias=core.packed_bias, core_nodes=core.products, heads_fixed=heads_lost or norm_fixed, softcap=core.softcap,
        rotary=tuple(rotary), kv_caches=tuple(caches), qk_tensors=(rotary[0].output, rotary[1].output) if own else None,
        qk_norms=qk_norms, qk_whole=qk_whole, qk_norm=qk_norm,
        q_fixed=f"q is quantized at {quantized[0]}: rescaling its columns would change the rounding" if quantized
        else None,
        equal_widths="GroupQueryAttention takes one head size for Q, K and V" if gqa else None,
        pairs_shared="GroupQueryAttention's rotary cache holds one column per pair for every head" if shared else
        f"RotaryEmbedding {op_rotary}'s cos/sin caches hold one column per pair for every head" if op_rotary else
        PARTIAL_SHARED if any(r.rotated for r in rotary) else None,
        width_multiple=16 if shared else 1)  # onnxruntime's kernels: "head_size shall be a multiple of 16" with rotary


def _shape_edits(g: ModelGraph, block: AttentionBlock, traces: tuple[Trace, ...], merge_path: list[onnx.NodeProto],
                 region: set[str], core: AttentionCore) -> tuple[dict[str, Axes], list[ShapeEdit], str | None]:
    """Every Reshape entry on the block's paths that holds a pruned width (into the block): where
    the tracked axes are in each tensor on the way, the edits, and why whole heads cannot go
    where a Reshape loses the heads axis (None where none does)."""
    seen: dict[str, Axes] = {}
    edits: list[ShapeEdit] = []
    lost: list[str] = []
    for trace, kind in zip(traces, QKV):
        if block.fused is not None:  # from the (…, 3, H, d) reshape on: it is replaced, so not edited
            reshape = next(i for i, n in enumerate(trace.nodes) if n.name == block.fused.reshape)
            forward, start = list(reversed(trace.nodes[:reshape])), FUSED
        elif trace.selector is not None:  # a fused projection split: from the Split on, each part holds merged heads
            forward, start = list(reversed(trace.nodes[:trace.selector])), MERGED
        else:
            forward, start = list(reversed(trace.nodes)), MERGED
        passes = frozenset(n.name for n in trace.nodes if n.op_type in ("Add", "Concat", "RotaryEmbedding"))  # rotary, KV cache
        if trace.norm is not None:  # a QK-norm keeps every axis where it is
            passes |= {g.producer_of(trace.norm.output).name}
        edits += path_shape_edits(g, forward, Path.of(kind, block), block, region, start, lost, seen, passes)
    start = SPLIT if core.heads is None else MERGED
    seen[core.output] = start
    edits += path_shape_edits(g, merge_path, Path.of(Part.OUT, block), block, region, start, lost, seen)
    return seen, edits, lost[0] if lost else None


def _decoder_parts(g: ModelGraph, block: AttentionBlock, traces: tuple[Trace, ...], seen: dict[str, Axes],
                   core: AttentionCore) -> tuple[list[Rotary], list[KvCache], list[ShapeEdit]]:
    """The rotary embeddings and KV caches found on the way, with where their head axes are, and
    the shape edits of the rotary embeddings' tables."""
    caches, rotary = list(core.kv_caches), [core.rotary] if core.rotary is not None else []
    edits: list[ShapeEdit] = []
    for trace, kind in zip(traces, QKV):
        count = Path.of(kind, block).count
        for node in trace.nodes:
            axes = seen.get(node.name)
            if trace.kv is not None and node.op_type == "Concat" and node.name != getattr(trace.rotary, "node", None):
                rank = len(g.shapes.get(node.output[0]) or ())
                if axes is None or axes.merged or axes.heads is None or not rank:
                    raise NoMatch(f"{node.name}: cannot tell the head axes of the KV cache")
                check_kv_axis(node, rank, (axes.dim, axes.heads))
                caches.append(replace(trace.kv, heads_axis=axes.heads, dim_axis=axes.dim))
            if trace.rotary is not None and node.name == trace.rotary.node:
                if kind is Part.VALUE:
                    raise NoMatch(f"a rotary embedding on V ({node.name})")
                if axes is None or axes.merged or axes.heads is None or axes.dim != -1:
                    raise NoMatch(f"{node.name}: the rotary embedding is not applied per head")
                if trace.rotary.per_token and axes.heads != -3:
                    raise NoMatch(f"{node.name}: the heads axis of RotaryEmbedding's input is not its second")
                if trace.half is not None and 2 * trace.half != (trace.rotary.rotated or block.head_dim):
                    raise NoMatch(f"{node.name} rotates {2 * trace.half} of {block.head_dim} head dims "
                                  "(a partial rotary embedding is matched as Concat(rotary(x[..., :r]), x[..., r:]) only)")
                rotary.append(replace(trace.rotary, heads=count, heads_axis=axes.heads))
                edits += trace.rotary_edits
    if traces and (traces[0].rotary is None) != (traces[1].rotary is None):
        raise NoMatch("a rotary embedding on only one of q and k")
    return rotary, caches, edits


def _qk_norms(g: ModelGraph, traces: tuple[Trace, ...], seen: dict[str, Axes], head_dim: int
              ) -> tuple[tuple[str, ...], str | None, str | None, QkNorm | None]:
    """A norm on q or k: per head (over the head dim: Qwen3, Gemma 3) whole heads may still go;
    over all heads (OLMo 2) neither heads nor dims may, as either changes its statistic. Returns
    the norms' last nodes, why whole heads cannot go, why Q/K keep their whole width (by default:
    a per-head norm's dims may be cut with QkNormCut, match/qk_norm.py) and the per-head norm's
    parts where a cut within the heads can rescale it."""
    norms = [(t.norm, kind) for t, kind in zip(traces, QKV[:2]) if t.norm is not None]
    if not norms:
        return (), None, None, None
    if len(norms) == 1:
        raise NoMatch(f"a norm on only one of q and k ({norms[0][0].output})")
    last = tuple(g.producer_of(norm.output).name for norm, _ in norms)
    heads_fixed = None
    found = []
    for norm, kind in norms:
        axes = seen.get(last[0 if kind is Part.QUERY else 1])
        if axes is None or axes.dim != -1:
            raise NoMatch(f"{norm.output}: cannot tell which axis the QK-norm normalises")
        if axes.merged:
            heads_fixed = heads_fixed or f"{norm.output} normalises q/k over all heads together"
        found.append(axes)
    whole = f"{norms[0][0].output} normalises each head's q/k: a cut within a head would change its RMS"
    if heads_fixed is not None:
        return last, heads_fixed, whole, None
    parts = qk_norm_parts(g, [norm for norm, _ in norms], found, head_dim)
    if isinstance(parts, str):
        return last, None, f"{whole} ({parts})", None
    return last, None, whole, parts


def _packed_block(core: AttentionCore, out: Linear) -> AttentionBlock:
    """An op that reads q, k and v from one packed projection (equal head widths, q|k|v in order;
    with grouped-query attention K and V have fewer heads)."""
    linear = core.packed
    assert linear is not None and core.heads is not None
    kv_heads = core.kv_heads or core.heads
    dim = linear.out_features // (core.heads + 2 * kv_heads)
    name = block_name(core.anchor.name, (linear, out))
    q_width, kv_width = core.heads * dim, kv_heads * dim
    return AttentionBlock(name, core.form or AttentionForm.PACKED, core.heads, dim, linear, linear, linear, out,
                          core.anchor.name, (0, q_width, q_width + kv_width), kv_heads=core.kv_heads)


def _check_private(g: ModelGraph, region: set[str], core: AttentionCore, traces: tuple[Trace, ...],
                   merge: list[onnx.NodeProto], out: Linear, seen: dict[str, Axes], rotary: list[Rotary],
                   caches: list[KvCache]) -> None:
    """Pruning changes every tensor of the region: nothing outside the block may read one, but for
    reads of the sizes of axes the cut leaves alone; no graph output but a KV cache's present one."""
    inside = set(core.nodes) | {n.name for t in traces for n in t.nodes} | {n.name for n in merge} | {out.node}
    inside |= {n.name for n in g.consumers_of(out.input) if n.op_type == "Reshape"}  # flattening its tokens
    inside |= {name for embedding in rotary for name in embedding.nodes}
    norm_nodes = {name for t in traces if t.norm is not None for name in t.norm.nodes}
    inside |= norm_nodes
    inside |= {name for cache in caches for name in cache.through}  # fp16 casts, a sliding window's slices
    region |= {t for name in norm_nodes for t in g.node(name).output}
    region |= {t for embedding in rotary for name in embedding.nodes if name in g.nodes for t in g.node(name).output}
    outputs = set(g.graph_outputs) - {cache.present for cache in caches}
    for tensor in region:
        if tensor in outputs:
            raise NoMatch(f"{tensor} is a graph output; pruning would change it")
        for reader in g.consumers_of(tensor):
            # Shape readers feed reshapes and scales, which are checked on their own
            if reader.name not in inside and reader.op_type != "Shape" and not _reads_sizes(g, reader, tensor, seen):
                raise NoMatch(f"{reader.op_type} node {reader.name} outside the attention reads {tensor}")


def _reads_sizes(g: ModelGraph, reader: onnx.NodeProto, tensor: str, seen: dict[str, Axes]) -> bool:
    """Is `reader` a Transpose of a region tensor whose copy only feeds Shape → Gather reads of
    axes the cut leaves alone (CLIP's text attention reads the key length so)?"""
    axes, rank = seen.get(tensor), len(g.shapes.get(tensor) or ())
    if reader.op_type != "Transpose" or axes is None or axes.merged or not rank:
        return False
    perm = list(attribute(reader, "perm", [])) or list(range(rank))[::-1]
    tracked = {p for p in (axes.dim, axes.heads, axes.part) if p is not None}
    for shape in g.consumers_of(reader.output[0]):
        if shape.op_type != "Shape" or attribute(shape, "start", 0) or attribute(shape, "end", None) is not None:
            return False
        for gather in g.consumers_of(shape.output[0]):
            index = g.constant(gather.input[1]) if gather.op_type == "Gather" else None
            if index is None or index.size != 1 or perm[int(index.reshape(-1)[0]) % rank] - rank in tracked:
                return False
    return True


def _check_frozen_scale(g: ModelGraph, scale: FrozenScale, region: set[str], head_dim: int) -> None:
    """A run-time scale may be frozen only if it depends on nothing but q/k's head width
    (torch's SDPA export: Shape(q)[-1] → Cast → Sqrt → Div → Sqrt)."""
    frontier, seen = [scale.tensor], set()
    while frontier:
        tensor = frontier.pop()
        if tensor in seen or g.is_constant(tensor):
            continue
        seen.add(tensor)
        source = shape_source(g, tensor)
        if source is not None:
            shaped, axes = source
            rank = len(g.shapes.get(shaped) or ())
            if shaped not in region or axes != [rank - 1] or g.dim(shaped, -1) not in (head_dim, None):
                raise NoMatch(f"the scale at {scale.node} depends on run-time values other than the head width")
            continue
        node = g.producer_of(tensor)
        if node is None or node.op_type not in ("Cast", "Sqrt", "Div", "Mul", "Pow", "Reciprocal", "Identity"):
            raise NoMatch(f"the scale at {scale.node} depends on run-time values other than the head width")
        frontier += [t for t in node.input if t]


def _separate_block(g: ModelGraph, name: str, core: AttentionCore, q: Trace, k: Trace, v: Trace,
                    out: Linear) -> AttentionBlock:
    if q.part is not None or k.part is not None or v.part is not None:
        raise NoMatch("a selection (Split/Gather/Slice) on a separate projection")
    if core.heads is not None:  # an op with merged heads: the count is its attribute
        kv_heads = core.kv_heads or core.heads
        dim = q.linear.out_features // core.heads
        if q.linear.out_features % core.heads or {k.linear.out_features, v.linear.out_features} != {kv_heads * dim}:
            raise NoMatch(f"{core.anchor.name}: the projections do not split evenly into {core.heads} heads")
        heads = core.heads
        if core.kv_heads is not None and core.kv_heads != heads:
            return AttentionBlock(name, AttentionForm.SEPARATE, heads, dim, q.linear, k.linear, v.linear, out, core.anchor.name,
                                  kv_heads=kv_heads)
    else:
        layouts = []
        for trace in (q, k, v):
            reshapes = [n for n in trace.nodes if n.op_type == "Reshape"]
            if not reshapes:
                raise NoMatch(f"no head-splitting Reshape after {trace.linear.node}")
            layouts.append(head_layout(g, reshapes[-1], trace.linear.out_features))  # the one next to the projection
        (heads, dim), (kv_heads, kv_dim), _ = layouts
        grouped = layouts[1] == layouts[2] and kv_dim == dim and kv_heads < heads and heads % kv_heads == 0
        if len(set(layouts)) != 1 and not grouped:
            raise NoMatch(f"Q, K and V head layouts differ: {layouts}")
        if grouped:  # grouped-query attention: each key/value head serves heads / kv_heads query heads
            return AttentionBlock(name, AttentionForm.SEPARATE, heads, dim, q.linear, k.linear, v.linear, out, core.anchor.name,
                                  kv_heads=kv_heads)
    return AttentionBlock(name, AttentionForm.SEPARATE, heads, dim, q.linear, k.linear, v.linear, out, core.anchor.name)


def _fused_block(g: ModelGraph, name: str, anchor: onnx.NodeProto, q: Trace, k: Trace, v: Trace,
                 out: Linear) -> AttentionBlock:
    """One projection for q, k and v: reshaped to (…, 3, H, d) (maybe permuted after), then one
    part taken by a Split, Slice or Gather along the 3-axis for each of q, k and v."""
    if sorted(p for p in (q.part, k.part, v.part) if p is not None) != [0, 1, 2]:
        raise NoMatch("fused projection: cannot tell which part is q, k and v")
    shared = [[n.name for n in t.nodes[t.selector + 1:]] for t in (q, k, v)]
    if shared[0] != shared[1] or shared[0] != shared[2]:
        raise NoMatch("q, k and v are not taken from one reshaped fused projection")
    before = list(reversed(q.nodes[q.selector + 1:]))  # from the projection to the selectors
    if not before and q.nodes[q.selector].op_type == "Split":
        return _split_block(g, name, anchor, q, k, v, out)
    if not before and q.nodes[q.selector].op_type == "Slice":
        return _slice_block(g, name, anchor, q, k, v, out)
    if not before or before[0].op_type != "Reshape":
        raise NoMatch("fused projection is not reshaped to (…, 3, H, d) before q, k and v are taken apart")
    reshape, replay = before[0], before[1:]
    if any(n.op_type not in ("Transpose", "Identity") for n in replay):
        raise NoMatch(f"fused projection: {[n.op_type for n in replay]} between its reshape and the split")
    entries = shape_entries(g, reshape.input[1])
    if entries is None or len(entries) < 3 or entries[-3] != 3:
        raise NoMatch("fused projection is not reshaped to (…, 3, H, d)")
    heads, dim = head_layout(g, reshape, q.linear.out_features // 3)
    axis = len(entries) - 3  # the 3-axis, followed through the Transposes to the selectors
    for node in replay:
        if node.op_type == "Transpose":
            axis = list(attribute(node, "perm", [])).index(axis)
    parts = {t.part: t for t in (q, k, v)}
    width = heads * dim
    fused = FusedQkv(reshape.name, tuple(parts[i].part_tensor for i in range(3)), tuple(n.name for n in replay), axis,
                     tuple(parts[i].nodes[parts[i].selector].op_type == "Gather" and
                           g.constant(parts[i].nodes[parts[i].selector].input[1]).ndim == 0 for i in range(3)))
    return AttentionBlock(name, AttentionForm.FUSED_QKV, heads, dim, q.linear, k.linear, v.linear, out, anchor.name,
                          (q.part * width, k.part * width, v.part * width), fused)


def _split_block(g: ModelGraph, name: str, anchor: onnx.NodeProto, q: Trace, k: Trace, v: Trace,
                 out: Linear) -> AttentionBlock:
    """One projection for q, k and v split along its features into three parts (GPT-2's c_attn;
    onnxruntime-genai's qkv_proj before QK-norms, with grouped-query attention q | k | v of
    H·d | G·d | G·d features): each part is then split into heads on its own, and the Split's
    sizes follow the cut."""
    split = q.nodes[q.selector]
    rank = len(g.shapes.get(split.input[0]) or ())
    sizes = g.constant(split.input[1]) if len(split.input) > 1 and split.input[1] else None
    sizes = None if sizes is None else [int(s) for s in sizes.reshape(-1)]
    if sizes is None or len(sizes) != 3 or sum(sizes) != q.linear.out_features or not rank or \
            attribute(split, "axis", 0) not in (-1, rank - 1) or (q.part, k.part, v.part) != (0, 1, 2):
        raise NoMatch(f"{split.name} does not split the fused projection into q | k | v along its features")
    widths = {q.part: Width.QK_MERGED, k.part: Width.KV_QK_MERGED, v.part: Width.KV_V_MERGED}
    return _features_block(g, name, anchor, (q, k, v), out, sizes[0], sizes[1], sizes[2], split.name,
                           tuple(ShapeEdit(split.name, widths[part], part - 3) for part in range(3)))


def _slice_block(g: ModelGraph, name: str, anchor: onnx.NodeProto, q: Trace, k: Trace, v: Trace,
                 out: Linear) -> AttentionBlock:
    """One projection for q, k and v taken apart by three Slices along its features (Phi-3's
    qkv_proj): q = [0, H·d), k = [H·d, H·d + G·d), v = [H·d + G·d, end). The bounds between the
    parts follow the cut; v's end, past the last feature, stays."""
    slices = [t.nodes[t.selector] for t in (q, k, v)]
    total = q.linear.out_features
    bounds = []
    for node in slices:
        rank = len(g.shapes.get(node.input[0]) or ())
        axes = g.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        steps = g.constant(node.input[4]) if len(node.input) > 4 and node.input[4] else None
        if not rank or axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) not in (-1, rank - 1) or \
                steps is not None and (steps.size != 1 or int(steps.reshape(-1)[0]) != 1):
            raise NoMatch(f"{node.name} does not slice the fused projection along its features")
        start, end = (int(g.constant(node.input[i]).reshape(-1)[0]) for i in (1, 2))
        bounds.append((start, min(end, total)))
    (q0, q1), (k0, k1), (v0, v1) = bounds
    if (q0, q1, k1, v1) != (0, k0, v0, total):
        raise NoMatch(f"{slices[0].name}, {slices[1].name}, {slices[2].name} do not take q | k | v apart in order")
    edits = (ShapeEdit(slices[0].name, Width.QK_MERGED, -1, 2), ShapeEdit(slices[1].name, Width.QK_MERGED, -1, 1),
             ShapeEdit(slices[1].name, Width.QK_THEN_KV, -1, 2), ShapeEdit(slices[2].name, Width.QK_THEN_KV, -1, 1))
    return _features_block(g, name, anchor, (q, k, v), out, q1, k1 - k0, v1 - v0, slices[0].name, edits)


def _features_block(g: ModelGraph, name: str, anchor: onnx.NodeProto, traces: tuple[Trace, Trace, Trace],
                    out: Linear, width: int, k_width: int, v_width: int, where: str,
                    edits: tuple[ShapeEdit, ...]) -> AttentionBlock:
    """The block of a projection whose features are q | k | v, of `width`, `k_width` and `v_width`
    (grouped-query attention: G·d each for K and V)."""
    q, k, v = traces
    if k_width != v_width or width % k_width:
        raise NoMatch(f"{where}: q | k | v of {width} | {k_width} | {v_width} features are not H·d | G·d | G·d")
    reshapes = [n for n in q.nodes[:q.selector] if n.op_type == "Reshape"]
    if not reshapes:
        raise NoMatch(f"no head-splitting Reshape after {where}")
    heads, dim = head_layout(g, reshapes[-1], width)
    if k_width % dim or heads % (k_width // dim):
        raise NoMatch(f"{where}: {k_width} key/value features do not group {heads} heads of {dim}")
    kv_heads = k_width // dim
    return AttentionBlock(name, AttentionForm.FUSED_SPLIT, heads, dim, q.linear, k.linear, v.linear, out, anchor.name,
                          (0, width, width + k_width), kv_heads=kv_heads if kv_heads != heads else None,
                          shape_edits=edits)


def _region_tensors(q: Trace, k: Trace, v: Trace, core: AttentionCore) -> set[str]:
    """Tensors from the projections to the core, whose width follows the pruned Q/K/V widths."""
    tensors = {core.q, core.k, core.v, core.output}
    for trace in (q, k, v):
        tensors.add(trace.linear.output)
        for node in trace.nodes:
            tensors.update(node.output)
    return tensors


def drop_overlapping(blocks: list[AttentionBlock], skipped: list[Skipped]) -> None:
    """Two Softmaxes reading the same projections cannot be pruned independently."""
    owners: dict[str, int] = {}
    for block in blocks:
        for node in {block.q.node, block.k.node, block.v.node, block.out.node}:
            owners[node] = owners.get(node, 0) + 1
    for block in list(blocks):
        if any(owners[n] > 1 for n in {block.q.node, block.k.node, block.v.node, block.out.node}):
            blocks.remove(block)
            skipped.append(Skipped(block.anchor, Candidate.ATTENTION, "its projections are shared with another attention"))
