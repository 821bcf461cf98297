"""The match stage's vocabulary: what a match holds and what a failed match says.

Every fact later stages need about a block ends up in one of these dataclasses; a candidate
that does not fit raises `NoMatch` with a reason that names the node (shown by `inspect`).
They are frozen and hashable: a block is built once (attention.assemble adds what its later
steps find with `dataclasses.replace`), and later stages key their dicts by the block itself.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum


class NoMatch(Exception):
    """A candidate that does not fit; the message says why (shown by `inspect`)."""


@dataclass(frozen=True)
class Linear:
    """y = x·W (+ b): a MatMul with a constant weight plus an optional bias Add, or a Gemm."""

    node: str  # the MatMul, Gemm or FusedMatMul
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
    in_reshape: str | None = None  # a Reshape flattening the tokens before a 2-D product: last entry = in_features
    out_reshape: str | None = None  # one restoring them after it: last entry = out_features


class Width(str, Enum):
    """A size a cut changes, which a shape entry or attribute holds."""

    QK = "qk"  # per-head Q/K width
    V = "v"  # per-head V width
    QK_MERGED = "qk_merged"  # heads × per-head Q/K width
    V_MERGED = "v_merged"
    HEADS = "heads"
    FUSED = "qkv_merged"  # a fused projection's output: q, k and v merged
    FFN = "ffn"  # FFN hidden neurons
    CHANNELS = "channels"  # residual-stream channels
    # grouped-query attention: K and V have fewer heads than Q (equal to the above without it)
    KV_HEADS = "kv_heads"
    KV_QK_MERGED = "kv_qk_merged"  # key heads × per-head Q/K width
    KV_V_MERGED = "kv_v_merged"  # value heads × per-head V width (before the heads are repeated)
    QK_HALF = "qk_half"  # half the per-head Q/K width: where a half-split rotary embedding splits q, k
    QK_THEN_KV = "qk_then_kv"  # q's and k's features of a q | k | v projection: where v starts
    # a partial rotary embedding (StableLM, Phi-2): the kept rotated dims per head, where q, k are
    # split into the rotated and the passed-through part, and half of them (its rotate_half split)
    QK_ROTATED = "qk_rotated"
    QK_ROTATED_HALF = "qk_rotated_half"


@dataclass(frozen=True)
class ShapeEdit:
    """A Reshape target-shape entry that holds a pruned width and must follow it (or an entry of
    another constant input holding one: Split sizes, Slice bounds)."""

    reshape: str
    width: Width
    position: int = -1  # which entry, counted from the end
    input: int = 1  # which input of the node holds the entries


@dataclass(frozen=True)
class FrozenScale:
    """A scalar Mul/Div between a projection and the softmax. A run-time one (computed from q's
    shape) is frozen to its original value when Q/K widths change; a `constant` one is fixed at
    export. Either may carry the factor that puts the scale in standard form (rewriting)."""

    node: str
    input_index: int
    tensor: str
    constant: bool = False
    attribute: str | None = None  # the scale is this attribute of `node` (FusedMatMul's alpha), not an input


@dataclass(frozen=True)
class FusedQkv:
    """One [D, 3D] projection reshaped to (…, 3, H, d), maybe permuted, and q, k, v each taken by a
    Split, Slice or Gather along the 3-axis. The rewrite splits the sliced projection by width,
    reshapes each piece to (…, 1, H′, d′) and replays the permutation, so that it replaces the
    selected part (Q/K and V widths may then differ)."""

    reshape: str  # the (…, 3, H, d) Reshape
    parts: tuple[str, str, str]  # the tensors the selectors give for q, k, v
    replay: tuple[str, ...] = ()  # the nodes (Transposes) between the reshape and the selectors
    part_axis: int = 0  # the 3-axis at the selectors' input
    dropped: tuple[bool, bool, bool] = (False, False, False)  # the selector (a scalar Gather) drops that axis


class RotaryStyle(str, Enum):
    """Which head dims a rotary position embedding rotates together (they are kept or removed
    together, so that every kept pair still rotates by its own frequency)."""

    HALF = "half"  # (i, i + d/2): rotate_half, as Llama, GPT-NeoX and the onnxruntime ops by default write it
    INTERLEAVED = "interleaved"  # (2i, 2i + 1): GPT-J style


@dataclass(frozen=True)
class Rotary:
    """A rotary position embedding on q or k: x·cos + rotate(x)·sin, written out op by op (the
    cos and sin tables read by `tables` are sliced to the kept dims of every head) or inside an
    attention op or the ONNX RotaryEmbedding op (`shared`: its caches hold one column per pair,
    for all heads alike; `per_token`: (…, N, d/2) caches computed at run time, captured for scoring
    like a written-out embedding's tables, rather than constant ones indexed by position)."""

    style: RotaryStyle
    node: str  # the Add joining the two products, or the attention op
    input: str  # x
    output: str  # x rotated
    tables: tuple[tuple[str, int], ...]  # (node, input index) of the cos and sin tables
    nodes: tuple[str, ...] = ()  # every node of the written-out rotation
    heads: int = 0  # heads of x
    heads_axis: int = -3  # where x's heads axis is, counted from the end (the tables broadcast along it)
    shared: bool = False
    rotated: int = 0  # a partial rotary embedding's rotated dims per head (the first ones); 0: every dim
    per_token: bool = False


class Part(str, Enum):
    """Which path of an attention: q, k or v from its projection to the scores (a KV cache holds
    keys or values), or attn·V on to the output projection."""

    QUERY = "query"
    KEY = "key"
    VALUE = "value"
    OUT = "out"


class Candidate(str, Enum):
    """What a skipped candidate would have been."""

    ATTENTION = "attention"
    FFN = "ffn"
    BLOCK = "block"  # a whole transformer block (attention + FFN), for --blocks


@dataclass(frozen=True)
class KvCache:
    """A KV cache: the past keys or values (a graph input) joined with this step's, and the joined
    tensor as a graph output. Both take the pruned width; their head and head-dim axes are these."""

    past: str
    present: str
    part: Part  # KEY or VALUE
    heads_axis: int = -3
    dim_axis: int = -1
    # Casts and Slices between the graph's cache and the join: an fp16 model with float32 inputs
    # and outputs casts it; a sliding-window cache (Mistral, Gemma 3 by torch's dynamo exporter)
    # keeps the last positions with a Slice along the sequence
    through: tuple[str, ...] = ()


class AttentionForm(str, Enum):
    """How a block's projections and core are laid out in the graph (shown by `inspect`)."""

    SEPARATE = "separate"  # a Linear each for q, k and v
    FUSED_QKV = "fused-qkv"  # one projection reshaped to (…, 3, H, d), q, k, v selected along the 3-axis
    FUSED_SPLIT = "fused-split"  # one projection split along its features into q | k | v
    PACKED = "packed"  # q|k|v packed in one projection an attention op reads
    ORT_ATTENTION = "ort-attention"  # com.microsoft.Attention
    ORT_MHA = "ort-mha"  # com.microsoft.MultiHeadAttention
    ORT_GQA = "ort-gqa"  # com.microsoft.GroupQueryAttention


class QkNormCut(str, Enum):
    """Q/K dims within a head under a per-head QK-norm (compensate/qk_norm.py): kept whole (off), or
    cut with the norm's statistic over the kept dims as it falls (sliced) or with each head's norm
    weight rescaled by the calibration's mean ratio of the kept dims' mean square to the full one
    (calibrated)."""
    OFF = "off"
    SLICED = "sliced"
    CALIBRATED = "calibrated"


@dataclass(frozen=True)
class QkNorm:
    """A written-out per-head RMSNorm on q and k: where each one's weight γ (one entry per head dim)
    and ε sit, and the heads axis of the tensor it normalises, so that a cut within the heads can
    write γ per head and keep the statistic's scale (compensate/qk_norm.py)."""

    gains: tuple[tuple[str, int], tuple[str, int]]  # (node, input) of q's and k's γ
    epsilons: tuple[tuple[str, int], tuple[str, int]]  # (node, input) of q's and k's ε
    heads_axes: tuple[int, int]  # the heads axis of normalised q and k, counted from the end
    cut: QkNormCut = QkNormCut.OFF


class Placement(str, Enum):
    """Where a transformer block's norms sit relative to its residual joins."""

    PRE = "pre"  # x + f(LN(x))
    POST = "post"  # LN(x + f(x))


@dataclass(frozen=True)
class AttentionBlock:
    name: str
    form: AttentionForm
    heads: int
    head_dim: int
    q: Linear
    k: Linear
    v: Linear
    out: Linear
    anchor: str  # the Softmax, or the Attention op that holds the whole core
    column_offsets: tuple[int, int, int] = (0, 0, 0)  # where q, k, v start in a fused weight
    fused: FusedQkv | None = None
    shape_edits: tuple[ShapeEdit, ...] = ()
    frozen_scales: tuple[FrozenScale, ...] = ()
    softcap: float | None = None  # scores soft-capped before the softmax: cap·tanh(s/cap) (Gemma 2)
    constant_scales: tuple[FrozenScale, ...] = ()  # fixed ones on the Q·Kᵀ path
    attention_op: str | None = None  # an ONNX Attention node whose scale must be pinned
    scale: float | None = None  # that op's original softmax scale
    packed_bias: str | None = None  # com.microsoft.MultiHeadAttention's [q | k | v] bias input
    heads_fixed: str | None = None  # why whole heads cannot be removed here, if they cannot
    q_fixed: str | None = None  # why q's columns cannot be rescaled exactly (no standard form, no Q/K rescale)
    core_nodes: tuple[str, str] = ("", "")  # the nodes computing Q·Kᵀ and attn·V (an attention op: twice)
    # decoders: grouped-query attention (query head h reads key/value head h // (heads / kv_heads)),
    # rotary embeddings on q and k, KV caches
    kv_heads: int | None = None
    rotary: tuple[Rotary, ...] = ()
    kv_caches: tuple[KvCache, ...] = ()
    qk_tensors: tuple[str, str] | None = None  # rotated q and k as the scores read them, captured for scoring
    pairs_shared: str | None = None  # why every head must keep the same Q/K pairs
    equal_widths: str | None = None  # why Q/K and V must keep the same per-head width
    width_multiple: int = 1  # kept per-head widths must be a multiple of this (an op's kernel requires it)
    # QK-norm (Qwen3, Gemma 3, OLMo 2): an RMSNorm over each head's q/k (or over all heads) between
    # the projection and the scores; cutting dims within a head would change its statistic
    qk_norms: tuple[str, ...] = ()  # the norms' last nodes
    qk_whole: str | None = None  # why Q/K keep their whole per-head width, if they must
    qk_norm: QkNorm | None = None  # a per-head QK-norm whose γ a cut within the heads can rescale

    @property
    def groups(self) -> int:
        """Key/value heads: the head-level unit (a whole group of query heads goes with its KV head)."""
        return self.kv_heads or self.heads

    @property
    def group_size(self) -> int:
        return self.heads // self.groups

    @property
    def causal(self) -> bool:
        """A decoder's attention (KV caches or a rotary embedding): each query sees the keys before it."""
        return bool(self.kv_caches or self.rotary)

    @property
    def v_input(self) -> str:
        """The out projection's input: attn·V with heads merged, column h·d + j = V neuron j of head h."""
        return self.out.input


@dataclass(frozen=True)
class FfnBlock:
    name: str
    fc1: Linear
    fc2: Linear
    activation: str  # op types between fc1 and fc2, for display
    gate: Linear | None = None  # a gated FFN (SwiGLU, GeGLU): act(x·W_gate) ∘ (x·W_fc1), then fc2
    # one projection for gate | up (Phi-3's gate_up_proj): fc1 and gate are its two halves, their
    # columns from these offsets, and the split's sizes or slices' bounds follow the cut
    columns: tuple[int, int] = (0, 0)  # where fc1's and the gate's columns start in their weights
    shape_edits: tuple[ShapeEdit, ...] = ()

    @property
    def hidden(self) -> int:
        return self.fc1.out_features


@dataclass(frozen=True)
class Skipped:
    where: str
    kind: Candidate
    reason: str


@dataclass(frozen=True)
class Layer:
    """A whole transformer block: attention and FFN joined to the residual stream, from the stream
    tensor it reads to the one it writes. Removing it makes the output the input."""

    name: str
    attention: AttentionBlock
    ffn: FfnBlock
    input: str
    output: str
    norm: Placement
    middle: str = ""  # the stream between the attention and the FFN (after the attention's join)
    renorm: str = ""  # a pre-norm SkipLayerNormalization joining the FFN: its normalised output must be
    #                   recomputed from `input` when the block goes (the next block's norm lives in it)


@dataclass(frozen=True)
class Matches:
    attention: tuple[AttentionBlock, ...]
    ffn: tuple[FfnBlock, ...]
    skipped: tuple[Skipped, ...]
    layers: tuple[Layer, ...] = ()

    @property
    def first_block_reason(self) -> str | None:
        """Why the first attention is no whole transformer block (e.g. a parallel block), if so."""
        return next((s.reason for s in self.skipped if s.kind is Candidate.BLOCK), None)


def unique_names(blocks: list) -> list:
    """Flat-named exports can give two blocks the same name: the blocks with the repeats numbered."""
    seen: dict[str, int] = {}
    named = []
    for block in blocks:
        count = seen.get(block.name, 0)
        seen[block.name] = count + 1
        named.append(replace(block, name=f"{block.name}#{count}") if count else block)
    return named


def block_name(node_name: str, linears: tuple[Linear, Linear]) -> str:
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


def common_scope(first: str, second: str) -> str:
    """The shared leading path of two node names ("/blocks/blocks.0/mlp/fc1/MatMul", …)."""
    a, b = [p for p in first.split("/") if p], [p for p in second.split("/") if p]
    shared = []
    for x, y in zip(a[:-1], b[:-1]):
        if x != y:
            break
        shared.append(x)
    return "/".join(shared)
