"""Stage 3: find the attention and FFN blocks that can be pruned.

Attention is found from its Softmax: the scores are Q·Kᵀ (maybe scaled, maybe plus a mask) and
the MatMul after the Softmax takes V. From there each operand is traced back through the
reshaping/selecting ops exporters put in between to its projection, and attn·V is traced
forward to the output projection. Every fact the rewriter needs ends up in a small dataclass;
a Softmax that does not fit is reported as skipped, with the reason, and never pruned.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import onnx

from .graph import ModelGraph, attribute

# Ops that only move, reshape or select data between a projection and the score MatMul.
_LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Split", "Gather", "Slice"}
_SCALE_OPS = {"Mul", "Div"}
# Ops allowed between Softmax and attn·V (dropout, the NaN guard of torch's SDPA export, casts).
_PROBS_PASS = {"Where", "Cast", "Dropout", "Identity"}
# Element-wise ops of an FFN activation (GELU as Erf chain or op, ReLU, SiLU, tanh-GELU).
_ACTIVATION_OPS = {"Div", "Mul", "Add", "Sub", "Erf", "Gelu", "Relu", "Sigmoid", "Tanh", "Pow",
                   "Cast", "FastGelu", "BiasGelu", "HardSigmoid", "Softplus", "Identity"}


# onnxruntime contrib attention ops onnxsnp does not rewrite yet: listed as skipped, with the reason
_UNSUPPORTED_CONTRIB = ("MultiHeadAttention", "PackedAttention", "PackedMultiHeadAttention", "GroupQueryAttention",
                        "DecoderMaskedMultiHeadAttention", "DecoderMaskedSelfAttention", "LongformerAttention",
                        "SparseAttention")


class NoMatch(Exception):
    """A candidate that does not fit; the message says why (shown by `inspect`)."""


@dataclass(frozen=True)
class Linear:
    """y = x·W (+ b): a MatMul with a constant weight plus an optional bias Add, or a Gemm."""

    node: str  # the MatMul or Gemm
    weight: str  # weight tensor as the node reads it (maybe an Identity output)
    weight_index: int
    transposed: bool  # weight stored as [out, in] (Gemm transB=1)
    bias_node: str | None  # the Add (or the Gemm itself)
    bias: str | None
    bias_index: int
    input: str
    output: str | None  # after the bias; None where the projection happens inside a fused op
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ShapeEdit:
    """A Reshape target-shape entry that holds a pruned width and must follow it."""

    reshape: str
    width: str  # "qk"/"v": per-head Q/K or V width; "qk_merged"/"v_merged": heads × that width; "heads"
    position: int = -1  # which entry, counted from the end


@dataclass(frozen=True)
class FrozenScale:
    """A scalar Mul/Div between a projection and the softmax. A run-time one (computed from q's
    shape) is frozen to its original value when Q/K widths change; a `constant` one is fixed at
    export. Either may carry the factor that puts the scale in standard form (rewriting)."""

    node: str
    input_index: int
    tensor: str
    constant: bool = False


@dataclass(frozen=True)
class FusedQkv:
    """One [D, 3D] projection reshaped to (…, 3, H, d), permuted and split into q, k, v."""

    reshape: str  # the (…, 3, H, d) Reshape
    parts: tuple[str, str, str]  # the tensors holding q, k, v per head, shape (B, H, N, d)
    perm: tuple[int, ...]  # the 5-D permutation


@dataclass
class AttentionBlock:
    name: str
    form: str  # "separate" (q/k/v Linear each), "fused-qkv", or "ort-attention" (com.microsoft.Attention)
    heads: int
    head_dim: int
    q: Linear
    k: Linear
    v: Linear
    out: Linear
    anchor: str  # the Softmax, or the Attention op that holds the whole core
    column_offsets: tuple[int, int, int] = (0, 0, 0)  # where q, k, v start in a fused weight
    fused: FusedQkv | None = None
    shape_edits: list[ShapeEdit] = field(default_factory=list)
    frozen_scales: list[FrozenScale] = field(default_factory=list)
    constant_scales: list[FrozenScale] = field(default_factory=list)  # fixed ones on the Q·Kᵀ path
    attention_op: str | None = None  # an ONNX Attention node whose scale must be pinned
    scale: float | None = None  # that op's original softmax scale
    packed_bias: str | None = None  # com.microsoft.MultiHeadAttention's [q | k | v] bias input
    heads_fixed: str | None = None  # why whole heads cannot be removed here, if they cannot
    core_nodes: tuple[str, str] = ("", "")  # the nodes computing Q·Kᵀ and attn·V (an attention op: twice)

    @property
    def v_input(self) -> str:
        """The out projection's input: attn·V with heads merged, column h·d + j = V neuron j of head h."""
        return self.out.input


@dataclass
class FfnBlock:
    name: str
    fc1: Linear
    fc2: Linear
    activation: str  # op types between fc1 and fc2, for display

    @property
    def hidden(self) -> int:
        return self.fc1.out_features


@dataclass
class Skipped:
    where: str
    kind: str
    reason: str


@dataclass
class Layer:
    """A whole transformer block: attention and FFN joined to the residual stream, from the stream
    tensor it reads to the one it writes. Removing it makes the output the input."""

    name: str
    attention: AttentionBlock
    ffn: FfnBlock
    input: str
    output: str
    norm: str  # "pre" (x + f(LN(x))) or "post" (LN(x + f(x)))
    middle: str = ""  # the stream between the attention and the FFN (after the attention's join)


@dataclass
class Matches:
    attention: list[AttentionBlock]
    ffn: list[FfnBlock]
    skipped: list[Skipped]
    layers: list[Layer] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
def find_blocks(g: ModelGraph) -> Matches:
    attention: list[AttentionBlock] = []
    skipped: list[Skipped] = []
    for anchor in g.nodes_of_type("Softmax", "Attention", *_UNSUPPORTED_CONTRIB):
        try:
            if anchor.domain == "com.microsoft":
                attention.append(_ort_attention_block(g, anchor))
            else:
                core = _softmax_core(g, anchor) if anchor.op_type == "Softmax" else _attention_op_core(g, anchor)
                attention.append(_assemble(g, core))
        except NoMatch as why:
            skipped.append(Skipped(anchor.name, "attention", str(why)))
    _drop_overlapping(attention, skipped)
    attention_linears = {n for block in attention for n in (block.q.node, block.k.node, block.v.node, block.out.node)}
    ffn, ffn_skipped = _match_ffns(g, attention_linears)
    _unique_names(attention)
    _unique_names(ffn)
    return Matches(attention, ffn, skipped + ffn_skipped, _match_layers(g, attention, ffn))


def _unique_names(blocks: list) -> None:
    """Flat-named exports can give two blocks the same name; number the repeats."""
    seen: dict[str, int] = {}
    for block in blocks:
        count = seen.get(block.name, 0)
        seen[block.name] = count + 1
        if count:
            block.name = f"{block.name}#{count}"


def _match_layers(g: ModelGraph, attention: list[AttentionBlock], ffn: list[FfnBlock]) -> list[Layer]:
    """Pair each attention with the FFN after it through their residual joins."""
    by_input = {block.fc1.input: block for block in ffn}
    layers = []
    for block in attention:
        first = _residual_join(g, block.out.output)
        if first is None:
            continue
        stream_in = first[0]
        # pre-norm blocks read LN(x); post-norm blocks read x and normalise after the join
        norm = "pre" if block.q.input == _normalized(g, stream_in) else "post" if block.q.input == stream_in else None
        if norm is None:
            continue
        after_attention = _joined(g, first, norm)
        mlp = by_input.get(after_attention if norm == "post" else _normalized(g, after_attention) or "")
        second = _residual_join(g, mlp.fc2.output) if mlp is not None else None
        if second is None or second[0] != after_attention or _joined(g, second, norm) is None:
            continue
        name = _common_scope(block.name + "/x", mlp.name + "/x") or block.name
        layers.append(Layer(name, block, mlp, stream_in, _joined(g, second, norm), norm, after_attention))
    return layers


def _residual_join(g: ModelGraph, branch: str | None) -> tuple[str, onnx.NodeProto] | None:
    """(stream in, joining node) where a sub-block's output is added to the residual stream:
    Add(x, f), or SkipLayerNormalization(f, x) which adds and normalises in one op."""
    readers = g.consumers_of(branch) if branch else []
    if len(readers) != 1 or readers[0].op_type not in ("Add", "SkipLayerNormalization"):
        return None
    others = [t for t in readers[0].input[:2] if t != branch]
    if len(others) != 1 or g.is_constant(others[0]):
        return None
    return others[0], readers[0]


def _joined(g: ModelGraph, join: tuple[str, onnx.NodeProto], norm: str) -> str | None:
    """The stream after a join: the Add's output (pre-norm) or the normalised sum (post-norm)."""
    node = join[1]
    if node.op_type == "SkipLayerNormalization":
        return node.output[0] if norm == "post" else None
    if norm == "pre":
        return node.output[0]
    after = g.consumers_of(node.output[0])
    return after[0].output[0] if len(after) == 1 and after[0].op_type == "LayerNormalization" else None


def _normalized(g: ModelGraph, stream: str) -> str | None:
    """The output of the LayerNormalization that reads `stream`, if there is exactly one."""
    norms = [n for n in g.consumers_of(stream) if n.op_type == "LayerNormalization"]
    return norms[0].output[0] if len(norms) == 1 else None


def _drop_overlapping(blocks: list[AttentionBlock], skipped: list[Skipped]) -> None:
    """Two Softmaxes reading the same projections cannot be pruned independently."""
    owners: dict[str, int] = {}
    for block in blocks:
        for node in {block.q.node, block.k.node, block.v.node, block.out.node}:
            owners[node] = owners.get(node, 0) + 1
    for block in list(blocks):
        if any(owners[n] > 1 for n in {block.q.node, block.k.node, block.v.node, block.out.node}):
            blocks.remove(block)
            skipped.append(Skipped(block.anchor, "attention", "its projections are shared with another attention"))


# --- linear layers ----------------------------------------------------------------------------
def linear_producing(g: ModelGraph, tensor: str) -> Linear | None:
    """The Linear whose output is `tensor`, if `tensor` is produced by one."""
    node = g.producer_of(tensor)
    if node is None:
        return None
    if node.op_type == "Gemm":
        return _gemm_linear(g, node)
    if node.op_type == "Add":
        for i in (0, 1):
            bias, other = node.input[i], node.input[1 - i]
            value = g.constant(bias)
            matmul = g.producer_of(other)
            if value is None or value.ndim != 1 or matmul is None or matmul.op_type != "MatMul":
                continue
            linear = _matmul_linear(g, matmul)
            if linear is not None and value.shape[0] == linear.out_features and len(g.consumers.get(other, [])) == 1:
                return Linear(linear.node, linear.weight, 1, False, node.name, bias, i, linear.input,
                              node.output[0], linear.in_features, linear.out_features)
        return None
    if node.op_type == "MatMul":
        return _matmul_linear(g, node)
    return None


def linear_reading(g: ModelGraph, tensor: str) -> Linear | None:
    """The Linear that reads `tensor` as its activation input (the sole consumer)."""
    consumers = g.consumers_of(tensor)
    if len(consumers) != 1 or consumers[0].op_type not in ("MatMul", "Gemm") or consumers[0].input[0] != tensor:
        return None
    return linear_at(g, consumers[0])


def linear_at(g: ModelGraph, node: onnx.NodeProto) -> Linear | None:
    """The Linear computed by MatMul/Gemm `node`, with the bias Add that follows a MatMul."""
    if node.op_type == "Gemm":
        return _gemm_linear(g, node)
    if node.op_type != "MatMul":
        return None
    after = g.consumers_of(node.output[0])
    if len(after) == 1 and after[0].op_type == "Add":
        with_bias = linear_producing(g, after[0].output[0])
        if with_bias is not None and with_bias.node == node.name:
            return with_bias
    return _matmul_linear(g, node)


def _matmul_linear(g: ModelGraph, node: onnx.NodeProto) -> Linear | None:
    weight = g.constant(node.input[1])
    if weight is None or weight.ndim != 2 or g.is_constant(node.input[0]):
        return None
    return Linear(node.name, node.input[1], 1, False, None, None, -1, node.input[0], node.output[0],
                  int(weight.shape[0]), int(weight.shape[1]))


def _gemm_linear(g: ModelGraph, node: onnx.NodeProto) -> Linear | None:
    weight = g.constant(node.input[1])
    if weight is None or weight.ndim != 2 or attribute(node, "transA", 0):
        return None
    if attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0:
        return None  # scaled Gemm: not the plain x·W + b that slicing and refits assume
    transposed = bool(attribute(node, "transB", 0))
    out_features = weight.shape[0] if transposed else weight.shape[1]
    in_features = weight.shape[1] if transposed else weight.shape[0]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None:
        value = g.constant(bias)
        if value is None or value.size != out_features or value.ndim > 1:
            return None  # a broadcast or run-time C cannot follow a sliced output
    return Linear(node.name, node.input[1], 1, transposed, node.name if bias else None, bias, 2,
                  node.input[0], node.output[0], int(in_features), int(out_features))


# --- attention --------------------------------------------------------------------------------
@dataclass
class _Trace:
    """What was passed on the way from a score operand back to its projection."""

    linear: Linear
    nodes: list[onnx.NodeProto]  # from the operand back to the projection (exclusive)
    scales: list[FrozenScale]
    part: int | None = None  # which of q/k/v a fused projection's selector took
    part_tensor: str | None = None  # the selected tensor, shape (B, H, N, d)


@dataclass
class _Core:
    """Where Q, K and V enter the attention core and where its output leaves."""

    anchor: onnx.NodeProto
    q: str
    k: str  # K or Kᵀ: the path tracking follows whichever layout the graph uses
    v: str
    output: str  # attn·V, heads split (…, N, d) or, for a 3-D Attention op, merged
    frozen: list[FrozenScale]
    nodes: set[str] = field(default_factory=set)  # the core's own nodes (scores, softmax, attn·V)
    products: tuple[str, str] = ("", "")  # the Q·Kᵀ and attn·V nodes
    heads: int | None = None  # given by a 3-D Attention op
    scale: float | None = None


def _softmax_core(g: ModelGraph, softmax: onnx.NodeProto) -> _Core:
    default_axis = -1 if g.opset() >= 13 else 1  # before opset 13 Softmax flattened from axis 1
    if attribute(softmax, "axis", default_axis) not in (-1, 3):
        raise NoMatch("softmax is not over the last axis")
    frozen: list[FrozenScale] = []
    qk = _score_matmul(g, softmax.input[0], frozen, depth=0)
    if qk is None:
        raise NoMatch("no Q·Kᵀ MatMul before the softmax")
    av = _probs_consumer(g, softmax.output[0])
    # everything between Q·Kᵀ and attn·V: scale, mask, softmax, the NaN guard
    between = (nx.descendants(g.dag, qk.name) & nx.ancestors(g.dag, av.name)) | {qk.name, av.name}
    return _Core(softmax, qk.input[0], qk.input[1], av.input[1], av.output[0], frozen, between,
                 (qk.name, av.name))


def _attention_op_core(g: ModelGraph, node: onnx.NodeProto) -> _Core:
    """ONNX Attention (opset 23+): 4-D (B, H, N, d) inputs, or 3-D with q_num_heads."""
    if len(node.output) > 1 and any(node.output[1:]):
        raise NoMatch("Attention with a KV cache or score outputs")
    if len(node.input) > 4 and any(node.input[4:]):
        raise NoMatch("Attention with past key/value inputs")
    if attribute(node, "softcap", 0.0) or attribute(node, "qk_matmul_output_mode", 0):
        raise NoMatch("Attention with softcap or a non-default qk_matmul_output_mode")
    heads = attribute(node, "q_num_heads", None)
    if heads is not None and attribute(node, "kv_num_heads", heads) != heads:
        raise NoMatch("grouped-query Attention (kv_num_heads != q_num_heads)")
    scale = attribute(node, "scale", None)
    return _Core(node, node.input[0], node.input[1], node.input[2], node.output[0], [], {node.name},
                 (node.name, node.name), heads, None if scale is None else float(scale))


def _ort_attention_block(g: ModelGraph, node: onnx.NodeProto) -> AttentionBlock:
    """onnxruntime's com.microsoft.Attention (the transformers optimizer's fused BERT attention):
    one packed [D, Dq+Dk+Dv] weight and bias; qkv_hidden_sizes lets Q/K and V widths differ."""
    if node.op_type == "MultiHeadAttention":
        return _ort_mha_block(g, node)
    if node.op_type != "Attention":
        raise NoMatch(f"com.microsoft.{node.op_type} is not supported yet")
    if len(node.input) > 4 and any(node.input[4:]) or len(node.output) > 1 and any(node.output[1:]):
        raise NoMatch("Attention with past state, attention bias or present outputs")
    if attribute(node, "do_rotary", 0):
        raise NoMatch("Attention with rotary embeddings (pairs of head dims are tied)")
    weight = g.constant(node.input[1])
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    bias = g.constant(bias_name) if bias_name else None
    if weight is None or weight.ndim != 2 or (bias_name and (bias is None or bias.ndim != 1)):
        raise NoMatch("packed qkv weight or bias is not a constant")
    heads = int(attribute(node, "num_heads", 0))
    sizes = list(attribute(node, "qkv_hidden_sizes", []) or [weight.shape[1] // 3] * 3)
    if heads <= 0 or len(set(sizes)) != 1 or sum(sizes) != weight.shape[1] or sizes[0] % heads:
        raise NoMatch(f"qkv_hidden_sizes {sizes} are not equal widths split over {heads} heads")
    width = sizes[0]
    linear = Linear(node.name, node.input[1], 1, False, node.name if bias_name else None, bias_name, 2, node.input[0],
                    None, int(weight.shape[0]), int(weight.shape[1]))
    out, merge_path = _forward_to_linear(g, node.output[0])
    if out.in_features != width:
        raise NoMatch(f"output projection reads {out.in_features} features, attention gives {width}")
    head_dim = width // heads
    scale = attribute(node, "scale", None)
    block = AttentionBlock(_block_name(node.name, (linear, out)), "ort-attention", heads, head_dim, linear, linear,
                           linear, out, node.name, (0, width, 2 * width), attention_op=node.name,
                           scale=float(scale) if scale else head_dim ** -0.5, core_nodes=(node.name, node.name))
    region = {node.output[0]} | {t for n in merge_path for t in n.output}
    core = _Core(node, node.input[0], node.input[0], node.input[0], node.output[0], [], {node.name})
    _check_private(g, region, core, (), merge_path, out)
    block.shape_edits = _path_shape_edits(g, merge_path, "v", block, region, split=False)
    return block


def _ort_mha_block(g: ModelGraph, node: onnx.NodeProto) -> AttentionBlock:
    """com.microsoft.MultiHeadAttention fed by three bias-free projections; their biases are packed
    into the op's bias input (the transformers optimizer with use_multi_head_attention)."""
    if len(node.input) > 6 and any(node.input[6:]) or len(node.output) > 1 and any(node.output[1:]):
        raise NoMatch("MultiHeadAttention with past state or present outputs")
    linears = []
    for tensor in node.input[:3]:
        producer = g.producer_of(tensor) if tensor else None
        linear = _matmul_linear(g, producer) if producer is not None and producer.op_type == "MatMul" else None
        if linear is None:
            raise NoMatch("MultiHeadAttention query/key/value do not come from MatMuls with constant weights "
                          "(packed or cross-attention inputs are not supported)")
        linears.append(linear)
    q, k, v = linears
    if len({q.node, k.node, v.node}) != 3 or len({q.out_features, k.out_features, v.out_features}) != 1:
        raise NoMatch("MultiHeadAttention projections are shared or of different widths")
    heads, width = int(attribute(node, "num_heads", 0)), q.out_features
    if heads <= 0 or width % heads:
        raise NoMatch(f"{width} features do not split over {heads} heads")
    packed = node.input[3] if len(node.input) > 3 and node.input[3] else None
    if packed is not None:
        bias = g.constant(packed)
        if bias is None or bias.shape != (3 * width,):
            raise NoMatch("MultiHeadAttention bias is not a constant [q | k | v] vector")
    out, merge_path = _forward_to_linear(g, node.output[0])
    if out.in_features != width:
        raise NoMatch(f"output projection reads {out.in_features} features, attention gives {width}")
    head_dim = width // heads
    scale = attribute(node, "scale", None)
    block = AttentionBlock(_block_name(node.name, (q, out)), "ort-mha", heads, head_dim, q, k, v, out, node.name,
                           attention_op=node.name, scale=float(scale) if scale else head_dim ** -0.5,
                           packed_bias=packed, core_nodes=(node.name, node.name))
    region = {node.output[0], q.output, k.output, v.output} | {t for n in merge_path for t in n.output}
    core = _Core(node, q.output, k.output, v.output, node.output[0], [], {node.name})
    _check_private(g, region, core, (), merge_path, out)
    block.shape_edits = _path_shape_edits(g, merge_path, "v", block, region, split=False)
    return block


def _assemble(g: ModelGraph, core: _Core) -> AttentionBlock:
    q_trace = _trace_to_linear(g, core.q)
    k_trace = _trace_to_linear(g, core.k)
    v_trace = _trace_to_linear(g, core.v)
    out, merge_path = _forward_to_linear(g, core.output)
    scales = core.frozen + q_trace.scales + k_trace.scales
    frozen = [scale for scale in scales if not scale.constant]
    if any(not scale.constant for scale in v_trace.scales):
        raise NoMatch("V is scaled by a run-time value")

    name = _block_name(core.anchor.name, (q_trace.linear, out))
    if q_trace.linear.node == k_trace.linear.node == v_trace.linear.node:
        block = _fused_block(g, name, core.anchor, q_trace, k_trace, v_trace, out)
    elif len({q_trace.linear.node, k_trace.linear.node, v_trace.linear.node}) == 3:
        block = _separate_block(g, name, core, q_trace, k_trace, v_trace, out)
    else:
        raise NoMatch("Q, K and V share some but not all projections")
    if out.in_features != block.heads * block.head_dim:
        raise NoMatch(f"output projection reads {out.in_features} features, attention gives "
                      f"{block.heads}×{block.head_dim}")
    if core.anchor.op_type == "Attention":
        block.attention_op = core.anchor.name
        block.scale = core.scale if core.scale is not None else block.head_dim ** -0.5
    block.core_nodes = core.products
    region = _region_tensors(q_trace, k_trace, v_trace, merge_path, core)
    _check_private(g, region, core, (q_trace, k_trace, v_trace), merge_path, out)
    for scale in frozen:
        _check_frozen_scale(g, scale, region, block.head_dim)
    block.frozen_scales = frozen
    block.constant_scales = [scale for scale in scales if scale.constant]
    heads_split = core.heads is None  # a 3-D Attention op takes and gives merged heads
    for trace, kind in ((q_trace, "qk"), (k_trace, "qk"), (v_trace, "v")):
        forward = list(reversed(_after_part(trace) if block.fused else trace.nodes))
        block.shape_edits += _path_shape_edits(g, forward, kind, block, region, split=block.fused is not None)
    block.shape_edits += _path_shape_edits(g, merge_path, "v", block, region, split=heads_split)
    return block


def _check_private(g: ModelGraph, region: set[str], core: _Core, traces: tuple[_Trace, ...],
                   merge: list[onnx.NodeProto], out: Linear) -> None:
    """Pruning changes every tensor of the region: nothing outside the block may read one."""
    inside = set(core.nodes) | {n.name for t in traces for n in t.nodes} | {n.name for n in merge} | {out.node}
    outputs = set(g.graph_outputs)
    for tensor in region:
        if tensor in outputs:
            raise NoMatch(f"{tensor} is a graph output; pruning would change it")
        for reader in g.consumers_of(tensor):
            # Shape readers feed reshapes and scales, which are checked on their own
            if reader.name not in inside and reader.op_type != "Shape":
                raise NoMatch(f"{reader.op_type} node {reader.name} outside the attention reads {tensor}")


def _check_frozen_scale(g: ModelGraph, scale: FrozenScale, region: set[str], head_dim: int) -> None:
    """A run-time scale may be frozen only if it depends on nothing but q/k's head width
    (torch's SDPA export: Shape(q)[-1] → Cast → Sqrt → Div → Sqrt)."""
    frontier, seen = [scale.tensor], set()
    while frontier:
        tensor = frontier.pop()
        if tensor in seen or g.is_constant(tensor):
            continue
        seen.add(tensor)
        source = _shape_source(g, tensor)
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


def _after_part(trace: _Trace) -> list[onnx.NodeProto]:
    """The nodes between a fused projection's selected part and the score/attn·V MatMul."""
    for index, node in enumerate(trace.nodes):
        if trace.part_tensor in node.output:
            return trace.nodes[:index]
    return trace.nodes


def _block_name(node_name: str, linears: tuple[Linear, Linear]) -> str:
    """The node's scope ("/blocks/blocks.0/attn/Softmax" → "blocks/blocks.0/attn"); for exporters
    that name nodes flatly, the shared prefix of the two layers' parameter names."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) > 1:
        return "/".join(parts[:-1])
    first, second = ([t for t in (linear.bias, linear.weight) if t and "." in t] for linear in linears)
    if first and second:
        shared = []
        for x, y in zip(first[0].split("."), second[0].split(".")):
            if x != y:
                break
            shared.append(x)
        if shared:
            return ".".join(shared)
    return node_name


def _common_scope(first: str, second: str) -> str:
    """The shared leading path of two node names ("/blocks/blocks.0/mlp/fc1/MatMul", …)."""
    a, b = [p for p in first.split("/") if p], [p for p in second.split("/") if p]
    shared = []
    for x, y in zip(a[:-1], b[:-1]):
        if x != y:
            break
        shared.append(x)
    return "/".join(shared)


def _score_matmul(g: ModelGraph, tensor: str, frozen: list[FrozenScale], depth: int) -> onnx.NodeProto | None:
    """Walk back from the softmax input through scale and mask ops to the Q·Kᵀ MatMul."""
    node = g.producer_of(tensor)
    if node is None or depth > 6:
        return None
    if node.op_type == "MatMul":
        if g.is_constant(node.input[0]) or g.is_constant(node.input[1]):
            return None
        return node
    if node.op_type in _SCALE_OPS:
        scale = node.input[1]
        if not _is_scalar(g, scale):
            return None
        found = _score_matmul(g, node.input[0], frozen, depth + 1)
        if found is not None:
            frozen.append(FrozenScale(node.name, 1, scale, constant=g.is_constant(scale)))
        return found
    if node.op_type in ("Add", "Where", "Cast"):
        # Add: scores + mask; Where: masked_fill. Follow whichever input leads to the MatMul.
        candidates = node.input[1:] if node.op_type == "Where" else node.input
        for inp in candidates:
            before = len(frozen)
            found = _score_matmul(g, inp, frozen, depth + 1)
            if found is not None:
                return found
            del frozen[before:]
    return None


def _is_scalar(g: ModelGraph, tensor: str) -> bool:
    value = g.constant(tensor)
    if value is not None:
        return value.size == 1
    shape = g.shapes.get(tensor)
    return shape is not None and all(d == 1 for d in shape)


def _probs_consumer(g: ModelGraph, probs: str) -> onnx.NodeProto:
    for _ in range(4):
        consumers = [c for c in g.consumers_of(probs) if c.op_type != "IsNaN"]
        if len(consumers) != 1:
            raise NoMatch("the attention probabilities have several readers")
        node = consumers[0]
        if node.op_type == "MatMul" and node.input[0] == probs:
            return node
        if node.op_type not in _PROBS_PASS:
            break
        probs = node.output[0]
    raise NoMatch("no attn·V MatMul after the softmax")


def _trace_to_linear(g: ModelGraph, tensor: str) -> _Trace:
    nodes: list[onnx.NodeProto] = []
    scales: list[FrozenScale] = []
    part: int | None = None
    part_tensor: str | None = None
    for _ in range(16):
        linear = linear_producing(g, tensor)
        if linear is not None:
            return _Trace(linear, nodes, scales, part, part_tensor)
        node = g.producer_of(tensor)
        if node is None:
            raise NoMatch(f"{tensor} does not come from a projection with constant weights")
        if node.op_type in _SCALE_OPS:
            data, scale = node.input[0], node.input[1]
            if not _is_scalar(g, scale):
                raise NoMatch(f"{node.name} scales by a non-scalar")
            scales.append(FrozenScale(node.name, 1, scale, constant=g.is_constant(scale)))
            nodes.append(node)
            tensor = data
            continue
        if node.op_type not in _LAYOUT_OPS:
            raise NoMatch(f"{node.op_type} node {node.name} between a projection and the scores")
        if node.op_type in ("Split", "Gather", "Slice"):
            if part is not None:
                raise NoMatch(f"two selections on the way to the projection ({node.name})")
            part = _selected_part(g, node, tensor)
            part_tensor = nodes[-1].output[0] if nodes and nodes[-1].op_type == "Squeeze" else tensor
        nodes.append(node)
        tensor = node.input[0]
    raise NoMatch("projection not found within 16 ops")


def _selected_part(g: ModelGraph, node: onnx.NodeProto, tensor: str) -> int:
    """Which of the 3 q/k/v parts a Split/Gather/Slice on the fused tensor picks."""
    if node.op_type == "Split":
        if len(node.output) != 3:
            raise NoMatch(f"{node.name} splits into {len(node.output)} parts, not q/k/v")
        return list(node.output).index(tensor)
    if node.op_type == "Gather":
        index = g.constant(node.input[1])
        if index is None or index.size != 1:
            raise NoMatch(f"{node.name} gathers a run-time index")
        return int(index.reshape(-1)[0]) % 3
    starts, ends = g.constant(node.input[1]), g.constant(node.input[2])
    if starts is None or ends is None or starts.size != 1 or int(ends.reshape(-1)[0]) - int(starts.reshape(-1)[0]) != 1:
        raise NoMatch(f"{node.name} is not a single-part slice")
    return int(starts.reshape(-1)[0]) % 3


def _forward_to_linear(g: ModelGraph, tensor: str) -> tuple[Linear, list[onnx.NodeProto]]:
    path: list[onnx.NodeProto] = []
    for _ in range(8):
        linear = linear_reading(g, tensor)
        if linear is not None:
            return linear, path
        consumers = g.consumers_of(tensor)
        consumers = [c for c in consumers if c.op_type != "Shape"]
        if len(consumers) != 1 or consumers[0].op_type not in ("Transpose", "Reshape", "Identity"):
            break
        path.append(consumers[0])
        tensor = consumers[0].output[0]
    raise NoMatch("no output projection after attn·V")


def _head_layout(g: ModelGraph, reshape: onnx.NodeProto, width: int) -> tuple[int, int]:
    """(heads, head_dim) from a Reshape that splits `width` features into (…, H, d)."""
    entries = _shape_entries(g, reshape.input[1])
    out_shape = g.shapes.get(reshape.output[0])
    heads = entries[-2] if entries and len(entries) >= 2 else None
    dim = entries[-1] if entries else None
    if (heads is None or heads <= 0) and out_shape and len(out_shape) >= 2:
        heads = out_shape[-2]
    if (dim is None or dim <= 0) and out_shape:
        dim = out_shape[-1]
    if dim and dim > 0 and not (heads and heads > 0):
        heads = width // dim
    if heads and heads > 0 and not (dim and dim > 0):
        dim = width // heads
    if not heads or not dim or heads * dim != width:
        raise NoMatch(f"cannot read heads × head dim from {reshape.name}")
    return int(heads), int(dim)


def _separate_block(g: ModelGraph, name: str, core: _Core, q: _Trace, k: _Trace, v: _Trace,
                    out: Linear) -> AttentionBlock:
    if q.part is not None or k.part is not None or v.part is not None:
        raise NoMatch("a selection (Split/Gather/Slice) on a separate projection")
    if core.heads is not None:  # 3-D Attention op: heads from its attribute
        if q.linear.out_features % core.heads or len({q.linear.out_features, k.linear.out_features,
                                                       v.linear.out_features}) != 1:
            raise NoMatch("Attention projections do not split evenly into heads")
        heads, dim = core.heads, q.linear.out_features // core.heads
    else:
        layouts = []
        for trace in (q, k, v):
            reshapes = [n for n in trace.nodes if n.op_type == "Reshape"]
            if not reshapes:
                raise NoMatch(f"no head-splitting Reshape after {trace.linear.node}")
            layouts.append(_head_layout(g, reshapes[-1], trace.linear.out_features))  # the one next to the projection
        if len(set(layouts)) != 1:
            raise NoMatch(f"Q, K and V head layouts differ: {layouts}")
        heads, dim = layouts[0]
    return AttentionBlock(name, "separate", heads, dim, q.linear, k.linear, v.linear, out, core.anchor.name)


def _fused_block(g: ModelGraph, name: str, anchor: onnx.NodeProto, q: _Trace, k: _Trace, v: _Trace,
                 out: Linear) -> AttentionBlock:
    if sorted(p for p in (q.part, k.part, v.part) if p is not None) != [0, 1, 2]:
        raise NoMatch("fused projection: cannot tell which part is q, k and v")
    # The shared prefix: Linear → Reshape(…, 3, H, d) → Transpose(3-axis first) → selector.
    shared = q.nodes[-2:]
    if [n.op_type for n in shared] != ["Transpose", "Reshape"] or [n.name for n in k.nodes[-2:]] != [n.name for n in shared] \
            or [n.name for n in v.nodes[-2:]] != [n.name for n in shared]:
        raise NoMatch("fused projection is not Reshape(…, 3, H, d) → Transpose → split")
    transpose, reshape = shared
    perm = tuple(attribute(transpose, "perm", []))
    rank = len(perm)
    if rank < 3 or perm[0] != rank - 3:
        raise NoMatch("fused projection: the q/k/v axis is not moved first")
    entries = _shape_entries(g, reshape.input[1])
    if entries is None or len(entries) != rank or entries[-3] != 3:
        raise NoMatch("fused projection is not reshaped to (…, 3, H, d)")
    heads, dim = _head_layout(g, reshape, q.linear.out_features // 3)
    for trace in (q, k, v):
        if trace.part_tensor is None or len(trace.nodes) < 3:
            raise NoMatch("fused projection: selected part not found")
        # only the selector (and its Squeeze) may sit between the Transpose and the part
        between = trace.nodes[:-2]
        if any(n.op_type not in ("Split", "Gather", "Slice", "Squeeze", "Mul", "Div", "Transpose", "Reshape",
                                 "Identity") for n in between):
            raise NoMatch(f"unexpected op after the fused q/k/v split: {[n.op_type for n in between]}")
    parts = {q.part: q.part_tensor, k.part: k.part_tensor, v.part: v.part_tensor}
    width = heads * dim
    fused = FusedQkv(reshape.name, (parts[q.part], parts[k.part], parts[v.part]), perm)
    return AttentionBlock(name, "fused-qkv", heads, dim, q.linear, k.linear, v.linear, out, anchor.name,
                          (q.part * width, k.part * width, v.part * width), fused)


def _region_tensors(q: _Trace, k: _Trace, v: _Trace, merge: list[onnx.NodeProto], core: _Core) -> set[str]:
    """Tensors whose width follows the pruned Q/K/V widths."""
    tensors = {core.q, core.k, core.v, core.output}
    for trace in (q, k, v):
        tensors.add(trace.linear.output)
        for node in trace.nodes:
            tensors.update(node.output)
    for node in merge:
        tensors.update(node.output)
    return tensors


@dataclass(frozen=True)
class _Entry:
    """One entry of a Reshape's target shape."""

    value: int | None  # its value where known statically
    follows: bool = False  # read at run time from a pruned tensor's shape: it adapts by itself


def _entries(g: ModelGraph, shape: str, region: set[str] = frozenset()) -> list[_Entry] | None:
    """The entries of a shape tensor: a constant, or a Concat of constants and pieces read from
    other tensors' shapes (Shape→Gather→Unsqueeze, Shape(start, end), Slice(Shape))."""
    value = g.constant(shape)
    if value is not None:
        return [_Entry(int(x)) for x in value.reshape(-1)]
    node = g.producer_of(shape)
    pieces = node.input if node is not None and node.op_type == "Concat" else [shape]
    entries: list[_Entry] = []
    for piece in pieces:
        value = g.constant(piece)
        if value is not None:
            entries += [_Entry(int(x)) for x in value.reshape(-1)]
            continue
        source = _shape_source(g, piece)
        if source is None:
            return None
        tensor, axes = source
        entries += [_Entry(g.dim(tensor, axis), tensor in region) for axis in axes]
    return entries


def _shape_entries(g: ModelGraph, shape: str) -> list[int | None] | None:
    entries = _entries(g, shape)
    return None if entries is None else [e.value for e in entries]


def _shape_source(g: ModelGraph, tensor: str) -> tuple[str, list[int]] | None:
    """(T, axes) if `tensor` holds dims `axes` of T, read through Shape and Gather/Slice
    (maybe with Unsqueeze/Squeeze/Cast around)."""
    node = g.producer_of(tensor)
    while node is not None and node.op_type in ("Unsqueeze", "Cast", "Squeeze"):
        node = g.producer_of(node.input[0])
    if node is None:
        return None
    if node.op_type == "Shape":
        rank = len(g.shapes.get(node.input[0]) or ())
        start, end = attribute(node, "start", 0), attribute(node, "end", None)
        axes = list(range(rank))[start:end] if rank else []
        return (node.input[0], axes) if axes else None
    shape = g.producer_of(node.input[0]) if node.input else None
    if shape is None or shape.op_type != "Shape":
        return None
    inner = _shape_source(g, node.input[0])
    if inner is None:
        return None
    tensor, axes = inner
    if node.op_type == "Gather":
        index = g.constant(node.input[1])
        if index is None or index.size != 1 or not -len(axes) <= int(index.reshape(-1)[0]) < len(axes):
            return None
        return tensor, [axes[int(index.reshape(-1)[0])]]
    if node.op_type == "Slice" and len(node.input) >= 3:
        starts, ends = g.constant(node.input[1]), g.constant(node.input[2])
        if starts is None or ends is None or starts.size != 1 or ends.size != 1:
            return None
        picked = axes[int(starts.reshape(-1)[0]):int(ends.reshape(-1)[0])]
        return (tensor, picked) if picked else None
    return None


def _check_trailing(g: ModelGraph, reshape: onnx.NodeProto, entries: list[_Entry], position: int) -> None:
    """The dims after the tracked axis must pass through a Reshape unchanged, else the axis moved."""
    if position == -1:
        return
    before = (g.shapes.get(reshape.input[0]) or ())[len(g.shapes.get(reshape.input[0]) or ()) + position + 1:]
    after = entries[position + 1:]
    if len(before) != len(after):
        raise NoMatch(f"{reshape.name} changes the dims after the head dim")
    for dim, entry in zip(before, after):
        if not entry.follows and (dim is None or entry.value != dim):
            raise NoMatch(f"{reshape.name} may move the head dim")


def _path_shape_edits(g: ModelGraph, forward: list[onnx.NodeProto], kind: str, block: AttentionBlock,
                      region: set[str], split: bool) -> list[ShapeEdit]:
    """Follow the head-dim axis (and the heads axis) along a pruned path and list the Reshape
    entries that hold them.

    `split` says whether the path starts with heads split (…, H, N, d) or merged (…, H·d); axes
    are tracked as positions from the end through Transpose and Reshape, so an entry is edited
    because it holds the head dim, not because its value happens to equal d. Where the heads
    axis cannot be followed, whole-head pruning is marked impossible for the block."""
    d, merged = block.head_dim, block.heads * block.head_dim
    position = -1
    heads_at: int | None = -3 if split else None
    edits = []
    for node in forward:
        if node.op_type == "Transpose":
            perm = list(attribute(node, "perm", []))
            if not perm:
                raise NoMatch(f"{node.name} has no perm")
            position = perm.index(len(perm) + position) - len(perm)
            if heads_at is not None and len(perm) >= -heads_at:
                heads_at = perm.index(len(perm) + heads_at) - len(perm)
        elif node.op_type in ("Squeeze", "Unsqueeze"):
            out_rank = len(g.shapes.get(node.output[0]) or ())
            in_rank = len(g.shapes.get(node.input[0]) or ())
            if not out_rank or not in_rank:
                raise NoMatch(f"rank unknown around {node.name}")
            # only leading axes may come or go: the tracked axes keep their place from the end
            if max(-position, -(heads_at or -1)) > min(out_rank, in_rank):
                raise NoMatch(f"{node.name} squeezes an axis next to the head dim")
        elif node.op_type == "Reshape":
            entries = _entries(g, node.input[1], region)
            if entries is None or len(entries) < -position:
                raise NoMatch(f"cannot read the target shape of {node.name}")
            entry = entries[position]
            _check_trailing(g, node, entries, position)
            if not split:
                if entry.value == merged or entry.follows:
                    if entry.value == merged and not entry.follows:
                        edits.append(ShapeEdit(node.name, kind + "_merged", position))
                    continue
                if position != -1 or len(entries) < 2:
                    raise NoMatch(f"{node.name} reshapes the merged heads in an unknown way")
                heads = entries[-2]
                if entry.value not in (d, -1) or heads.value not in (block.heads, -1) and not heads.follows:
                    raise NoMatch(f"{node.name} does not split into (…, {block.heads}, {d})")
                split, heads_at = True, -2
                if entry.value == d:
                    edits.append(ShapeEdit(node.name, kind, -1))
                if heads.value == block.heads and not heads.follows:
                    edits.append(ShapeEdit(node.name, "heads", -2))
                continue
            in_rank = len(g.shapes.get(node.input[0]) or ())
            if position == -1 and heads_at == -2 and in_rank == len(entries) + 1 and \
                    (entry.follows or entry.value in (merged, -1)):
                split, heads_at = False, None  # (…, H, d) merged back into (…, H·d), h·d + j order
                if entry.value == merged and not entry.follows:
                    edits.append(ShapeEdit(node.name, kind + "_merged", -1))
                continue
            edits += _heads_entry(node, entries, heads_at, block)
            heads_at = _heads_after(node, entries, heads_at, position, block)
            if entry.follows or entry.value == -1:
                continue
            if entry.value == d:
                edits.append(ShapeEdit(node.name, kind, position))
            else:
                raise NoMatch(f"cannot tell which entry of {node.name}'s target shape holds the head dim")
        elif node.op_type not in ("Mul", "Div", "Identity", "Cast"):
            raise NoMatch(f"{node.op_type} node {node.name} on a pruned path")
    return edits


def _heads_entry(node: onnx.NodeProto, entries: list[_Entry], heads_at: int | None,
                 block: AttentionBlock) -> list[ShapeEdit]:
    """The edit for the heads entry of a Reshape that keeps heads split, if it is a literal H."""
    if heads_at is None or len(entries) < -heads_at:
        return []
    entry = entries[heads_at]
    if not entry.follows and entry.value == block.heads:
        return [ShapeEdit(node.name, "heads", heads_at)]
    return []


def _heads_after(node: onnx.NodeProto, entries: list[_Entry], heads_at: int | None,
                 position: int, block: AttentionBlock) -> int | None:
    """Where the heads axis is after a Reshape that keeps the head dim; None once it is lost
    (merged with another axis), which rules out removing whole heads in this block."""
    if heads_at is not None and len(entries) >= -heads_at:
        entry = entries[heads_at]
        if entry.follows or entry.value in (block.heads, -1):
            return heads_at
    literal = [e for i, e in enumerate(entries) if i - len(entries) != position and not e.follows and e.value not in (-1, 0)]
    if any(e.value == block.heads for e in literal) or heads_at is not None:
        block.heads_fixed = block.heads_fixed or f"{node.name} reshapes the heads axis in a way onnxsnp cannot follow"
    return None


# --- FFN ----------------------------------------------------------------------------------------
def _match_ffns(g: ModelGraph, taken: set[str]) -> tuple[list[FfnBlock], list[Skipped]]:
    blocks, skipped = [], []
    for node in g.nodes_of_type("MatMul", "Gemm"):
        fc2 = None if node.name in taken else linear_at(g, node)
        if fc2 is None:
            continue
        try:
            found = _ffn_before(g, fc2, taken)
        except NoMatch as why:
            if _looks_like_ffn(g, fc2):
                skipped.append(Skipped(node.name, "ffn", str(why)))
            continue
        if found is not None:
            blocks.append(found)
    # chained MLPs (A→act→B→act→C) match twice around B: prune neither rather than both
    uses: dict[str, int] = {}
    for block in blocks:
        for node in (block.fc1.node, block.fc2.node):
            uses[node] = uses.get(node, 0) + 1
    kept = [b for b in blocks if uses[b.fc1.node] == 1 and uses[b.fc2.node] == 1]
    skipped += [Skipped(b.fc2.node, "ffn", "shares a layer with another FFN (a chained MLP)")
                for b in blocks if b not in kept]
    return kept, skipped


def _bias_activation_fc1(g: ModelGraph, node: onnx.NodeProto) -> Linear | None:
    if node.op_type not in ("BiasGelu", "FastGelu") or len(node.input) < 2 or not node.input[1]:
        return None
    matmul = g.producer_of(node.input[0])
    bias = g.constant(node.input[1])
    if matmul is None or matmul.op_type != "MatMul" or bias is None or bias.ndim != 1:
        return None
    linear = _matmul_linear(g, matmul)
    if linear is None or bias.shape[0] != linear.out_features or len(g.consumers.get(node.input[0], [])) != 1:
        return None
    return Linear(linear.node, linear.weight, 1, False, node.name, node.input[1], 1, linear.input, linear.output,
                  linear.in_features, linear.out_features)


def _looks_like_ffn(g: ModelGraph, fc2: Linear) -> bool:
    producer = g.producer_of(fc2.input)
    return producer is not None and producer.op_type in _ACTIVATION_OPS


def _ffn_before(g: ModelGraph, fc2: Linear, taken: set[str]) -> FfnBlock | None:
    """fc1 → element-wise activation → fc2, where nothing else reads the hidden activations."""
    activation_nodes: dict[str, onnx.NodeProto] = {}
    frontier = [fc2.input]
    fc1: Linear | None = None
    while frontier:
        tensor = frontier.pop()
        linear = linear_producing(g, tensor)
        if linear is not None:
            if fc1 is not None and linear.node != fc1.node:
                raise NoMatch("the activation mixes two projections")
            fc1 = linear
            continue
        node = g.producer_of(tensor)
        if node is None or node.op_type not in _ACTIVATION_OPS:
            return None
        if node.name in activation_nodes:
            continue
        activation_nodes[node.name] = node
        biased = _bias_activation_fc1(g, node)
        if biased is not None:  # BiasGelu/FastGelu(x·W, b): fc1's bias lives in the activation
            if fc1 is not None and biased.node != fc1.node:
                raise NoMatch("the activation mixes two projections")
            fc1 = biased
            continue
        for inp in node.input:
            if not inp:
                continue
            value = g.constant(inp)
            if value is not None:
                if value.size != 1:
                    raise NoMatch(f"{node.name} applies a per-channel constant")
                continue
            frontier.append(inp)
    if fc1 is None or not activation_nodes or fc1.node in taken:
        return None
    if fc1.out_features != fc2.in_features:
        raise NoMatch("fc1 and fc2 widths differ")
    inside = {fc1.output} | {o for n in activation_nodes.values() for o in n.output}
    for tensor in inside:
        if tensor == fc2.input:
            if len(g.consumers.get(tensor, [])) != 1:
                raise NoMatch("the hidden activation has other readers")
            continue
        for consumer in g.consumers.get(tensor, []):
            if consumer not in activation_nodes:
                raise NoMatch("the hidden activation has readers outside the FFN")
    ops = sorted({n.op_type for n in activation_nodes.values()})
    name = _common_scope(fc1.node, fc2.node) or _block_name(fc2.node, (fc1, fc2))
    return FfnBlock(name, fc1, fc2, "+".join(ops))
