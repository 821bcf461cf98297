"""Attention rules: one small rule per anchor op, each reading an `AttentionCore` out of the
graph or raising `NoMatch` with the reason and the node. A new attention form is one more rule
in `ATTENTION_RULES` (the model: onnxscript's rewriter rules grouped in a rule set, onnxslim's
pattern registry); what follows the core — projections, head layout, shape edits, the checks
that the cut stays inside the block — is `attention.assemble`, the same for every rule."""
from __future__ import annotations

from collections.abc import Iterable

import networkx as nx
import onnx

from ..ir.graph import ModelGraph, attribute
from .attention import AttentionCore, assemble, drop_overlapping
from .tracing import SCALE_OPS, activation_qdq, is_scalar
from .blocks import AttentionBlock, AttentionForm, Candidate, FrozenScale, KvCache, Linear, NoMatch, Part, Rotary, RotaryStyle, Skipped
from .linear import linear_producing, matmul_linear

# Ops allowed between Softmax and attn·V (dropout, the NaN guard of torch's SDPA export, casts).
_PROBS_PASS = {"Where", "Cast", "Dropout", "Identity"}


class AttentionRule:
    """Where attention starts (`domain`, `op_type` of the anchor node) and how to read its core."""

    domain = ""
    op_type = ""

    def core(self, g: ModelGraph, anchor: onnx.NodeProto) -> AttentionCore:
        raise NotImplementedError


class SoftmaxOverScores(AttentionRule):
    """Softmax(scale·Q·Kᵀ + mask) · V, written out op by op (every exporter without a fused op)."""

    op_type = "Softmax"

    def core(self, g: ModelGraph, anchor: onnx.NodeProto) -> AttentionCore:
        default_axis = -1 if g.opset() >= 13 else 1  # before opset 13 Softmax flattened from axis 1
        if attribute(anchor, "axis", default_axis) not in (-1, 3):
            raise NoMatch("softmax is not over the last axis")
        frozen: list[FrozenScale] = []
        caps: list[float] = []
        qk = _score_matmul(g, anchor.input[0], frozen, depth=0, caps=caps)
        if qk is None:
            raise NoMatch("no Q·Kᵀ MatMul before the softmax")
        av = _probs_consumer(g, anchor.output[0])
        # everything between Q·Kᵀ and attn·V: scale, soft cap, mask, softmax, the NaN guard
        between = (nx.descendants(g.dag, qk.name) & nx.ancestors(g.dag, av.name)) | {qk.name, av.name}
        return AttentionCore(anchor, qk.input[0], qk.input[1], av.input[1], av.output[0], tuple(frozen),
                             frozenset(between), (qk.name, av.name), softcap=caps[0] if caps else None)


class OnnxAttention(AttentionRule):
    """ONNX Attention (opset 23+): 4-D (B, H, N, d) inputs, or 3-D with q_num_heads."""

    op_type = "Attention"

    def core(self, g: ModelGraph, anchor: onnx.NodeProto) -> AttentionCore:
        if len(anchor.output) > 1 and any(anchor.output[1:]):
            raise NoMatch("Attention with a KV cache or score outputs")
        if len(anchor.input) > 4 and any(anchor.input[4:]):
            raise NoMatch("Attention with past key/value inputs")
        if attribute(anchor, "softcap", 0.0) or attribute(anchor, "qk_matmul_output_mode", 0):
            raise NoMatch("Attention with softcap or a non-default qk_matmul_output_mode")
        heads = attribute(anchor, "q_num_heads", None)
        if heads is not None and attribute(anchor, "kv_num_heads", heads) != heads:
            raise NoMatch("grouped-query Attention (kv_num_heads != q_num_heads)")
        scale = attribute(anchor, "scale", None)
        return AttentionCore(anchor, *anchor.input[:3], anchor.output[0], nodes=frozenset({anchor.name}),
                             products=(anchor.name, anchor.name), heads=heads, op=anchor.name,
                             scale=None if scale is None else float(scale))


class OrtAttention(AttentionRule):
    """onnxruntime's com.microsoft.Attention (the transformers optimizer's fused BERT attention):
    one packed [D, Dq+Dk+Dv] weight and bias; qkv_hidden_sizes lets Q/K and V widths differ."""

    domain, op_type = "com.microsoft", "Attention"

    def core(self, g: ModelGraph, anchor: onnx.NodeProto) -> AttentionCore:
        if len(anchor.input) > 4 and any(anchor.input[4:]) or len(anchor.output) > 1 and any(anchor.output[1:]):
            raise NoMatch("Attention with past state, attention bias or present outputs")
        if attribute(anchor, "do_rotary", 0):
            raise NoMatch("Attention with rotary embeddings (pairs of head dims are tied)")
        weight = g.constant(anchor.input[1])
        bias_name = anchor.input[2] if len(anchor.input) > 2 and anchor.input[2] else None
        bias = g.constant(bias_name) if bias_name else None
        if weight is None or weight.ndim != 2 or (bias_name and (bias is None or bias.ndim != 1)):
            raise NoMatch("packed qkv weight or bias is not a constant")
        heads = int(attribute(anchor, "num_heads", 0))
        sizes = list(attribute(anchor, "qkv_hidden_sizes", []) or [weight.shape[1] // 3] * 3)
        if heads <= 0 or len(set(sizes)) != 1 or sum(sizes) != weight.shape[1] or sizes[0] % heads:
            raise NoMatch(f"qkv_hidden_sizes {sizes} are not equal widths split over {heads} heads")
        packed = Linear(anchor.name, anchor.input[1], 1, False, anchor.name if bias_name else None, bias_name, 2,
                        anchor.input[0], None, int(weight.shape[0]), int(weight.shape[1]))
        return AttentionCore(anchor, anchor.input[0], anchor.input[0], anchor.input[0], anchor.output[0],
                             nodes=frozenset({anchor.name}), products=(anchor.name, anchor.name), heads=heads,
                             op=anchor.name, scale=attribute(anchor, "scale", None) or None, packed=packed,
                             form=AttentionForm.ORT_ATTENTION)


class OrtMultiHeadAttention(AttentionRule):
    """com.microsoft.MultiHeadAttention fed by three bias-free projections; their biases are packed
    into the op's bias input (the transformers optimizer with use_multi_head_attention)."""

    domain, op_type = "com.microsoft", "MultiHeadAttention"

    def core(self, g: ModelGraph, anchor: onnx.NodeProto) -> AttentionCore:
        if len(anchor.input) > 6 and any(anchor.input[6:]) or len(anchor.output) > 1 and any(anchor.output[1:]):
            raise NoMatch("MultiHeadAttention with past state or present outputs")
        linears = []
        for tensor in anchor.input[:3]:
            producer = g.producer_of(tensor) if tensor else None
            linear = matmul_linear(g, producer) if producer is not None and producer.op_type == "MatMul" else None
            if linear is None:
                raise NoMatch("MultiHeadAttention query/key/value do not come from MatMuls with constant weights "
                              "(packed or cross-attention inputs are not supported)")
            linears.append(linear)
        q, k, v = linears
        if len({q.node, k.node, v.node}) != 3 or len({q.out_features, k.out_features, v.out_features}) != 1:
            raise NoMatch("MultiHeadAttention projections are shared or of different widths")
        heads, width = int(attribute(anchor, "num_heads", 0)), q.out_features
        if heads <= 0 or width % heads:
            raise NoMatch(f"{width} features do not split over {heads} heads")
        packed_bias = anchor.input[3] if len(anchor.input) > 3 and anchor.input[3] else None
        if packed_bias is not None:
            bias = g.constant(packed_bias)
            if bias is None or bias.shape != (3 * width,):
                raise NoMatch("MultiHeadAttention bias is not a constant [q | k | v] vector")
        return AttentionCore(anchor, q.output, k.output, v.output, anchor.output[0], nodes=frozenset({anchor.name}),
                             products=(anchor.name, anchor.name), heads=heads, op=anchor.name,
                             scale=attribute(anchor, "scale", None) or None, packed_bias=packed_bias,
                             form=AttentionForm.ORT_MHA)


class OrtGroupQueryAttention(AttentionRule):
    """com.microsoft.GroupQueryAttention (onnxruntime-genai's model builder): q|k|v packed in one
    projection (or three), fewer key/value heads, its own KV cache (past inputs 3, 4 → present
    outputs 1, 2) and, with do_rotary, its own rotary embedding whose cos/sin caches hold one column
    per pair for every head. One head size serves Q, K and V."""

    domain, op_type = "com.microsoft", "GroupQueryAttention"

    def core(self, g: ModelGraph, anchor: onnx.NodeProto) -> AttentionCore:
        inputs = list(anchor.input) + [""] * (12 - len(anchor.input))
        if any(inputs[10:]):
            raise NoMatch("GroupQueryAttention with an attention bias or head sinks (per-head inputs)")
        heads, kv_heads = int(attribute(anchor, "num_heads", 0)), int(attribute(anchor, "kv_num_heads", 0))
        if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
            raise NoMatch(f"{heads} query heads do not group over {kv_heads} key/value heads")
        caches = []
        for part, past, present in ((Part.KEY, inputs[3], anchor.output[1] if len(anchor.output) > 1 else ""),
                                    (Part.VALUE, inputs[4], anchor.output[2] if len(anchor.output) > 2 else "")):
            if past and (past in g.initializers or g.producer_of(past) is not None):
                raise NoMatch(f"GroupQueryAttention's past {part.value} {past} is not a graph input")
            if past or present:
                caches.append(KvCache(past, present if present in g.graph_outputs else "", part))
        if any(g.consumers_of(c.present) for c in caches if c.present):
            raise NoMatch("GroupQueryAttention's present keys or values are read inside the graph")
        rotary = None
        if attribute(anchor, "do_rotary", 0):
            if any(g.constant(t) is None for t in inputs[7:9]):
                raise NoMatch("GroupQueryAttention's cos/sin caches are not constants")
            style = RotaryStyle.INTERLEAVED if attribute(anchor, "rotary_interleaved", 0) else RotaryStyle.HALF
            rotary = Rotary(style, anchor.name, "", "", ((anchor.name, 7), (anchor.name, 8)), shared=True)
        common = dict(nodes=frozenset({anchor.name}), products=(anchor.name, anchor.name), heads=heads, op=anchor.name,
                      scale=attribute(anchor, "scale", None) or None, form=AttentionForm.ORT_GQA, kv_heads=kv_heads,
                      kv_caches=tuple(caches), rotary=rotary)
        if inputs[1] or inputs[2]:  # separate q, k, v
            return AttentionCore(anchor, inputs[0], inputs[1], inputs[2], anchor.output[0], **common)
        packed = linear_producing(g, inputs[0])
        if packed is None or len(g.consumers_of(inputs[0])) != 1:
            raise NoMatch("GroupQueryAttention's packed q|k|v does not come from a projection of its own")
        if packed.out_features % (heads + 2 * kv_heads):
            raise NoMatch(f"{packed.out_features} packed features do not split into {heads} + 2×{kv_heads} heads")
        return AttentionCore(anchor, inputs[0], inputs[0], inputs[0], anchor.output[0], packed=packed,
                             region=(inputs[0],), **common)


class NotSupportedYet(AttentionRule):
    """An attention op onnxsnp knows but does not rewrite: listed as skipped, by name."""

    def __init__(self, domain: str, op_type: str, why: str = "is not supported yet"):
        self.domain, self.op_type, self.why = domain, op_type, why

    def core(self, g: ModelGraph, anchor: onnx.NodeProto) -> AttentionCore:
        raise NoMatch(f"{self.domain}.{self.op_type} {self.why}")


class RuleSet:
    """Rules by the (domain, op type) of the node they start from; nodes are visited in graph order."""

    def __init__(self, rules: Iterable[AttentionRule]):
        self.rules = {(rule.domain, rule.op_type): rule for rule in rules}

    def rule_for(self, node: onnx.NodeProto) -> AttentionRule | None:
        return self.rules.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type))

    def match(self, g: ModelGraph) -> tuple[list[AttentionBlock], list[Skipped]]:
        blocks: list[AttentionBlock] = []
        skipped: list[Skipped] = []
        for node in g.model.graph.node:
            rule = self.rule_for(node)
            if rule is None:
                continue
            try:
                blocks.append(assemble(g, rule.core(g, node)))
            except NoMatch as why:
                skipped.append(Skipped(node.name, Candidate.ATTENTION, str(why)))
        drop_overlapping(blocks, skipped)
        return blocks, skipped


ATTENTION_RULES = RuleSet([
    SoftmaxOverScores(), OnnxAttention(), OrtAttention(), OrtMultiHeadAttention(), OrtGroupQueryAttention(),
    *(NotSupportedYet("com.microsoft", op) for op in (
        "PackedAttention", "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention",
        "DecoderMaskedSelfAttention", "LongformerAttention", "SparseAttention")),
])


def _score_matmul(g: ModelGraph, tensor: str, frozen: list[FrozenScale], depth: int,
                  caps: list[float] | None = None) -> onnx.NodeProto | None:
    """Walk back from the softmax input through scale and mask ops (and a soft cap, noted in
    `caps`) to the Q·Kᵀ MatMul."""
    node = g.producer_of(tensor)
    if node is None or depth > 8:
        return None
    capped = _soft_cap(g, node) if caps is not None and not caps else None
    if capped is not None:  # cap·tanh(s/cap): its two constants are the cap's, not the scores' scale
        inner, cap = capped
        found = _score_matmul(g, inner, frozen, depth + 1, caps)
        if found is not None:
            caps.append(cap)
        return found
    if node.op_type in ("MatMul", "FusedMatMul"):
        if g.is_constant(node.input[0]) or g.is_constant(node.input[1]):
            return None
        if node.op_type == "FusedMatMul":  # onnxruntime's MatMul with kᵀ (transB) and the scale (alpha) inside
            if any(attribute(node, a, 0) for a in ("transA", "transBatchA", "transBatchB")):
                return None
            if attribute(node, "alpha", 1.0) != 1.0:
                frozen.append(FrozenScale(node.name, -1, node.output[0], constant=True, attribute="alpha"))
        return node
    if node.op_type in SCALE_OPS:
        scale = node.input[1]
        if not is_scalar(g, scale):
            return None
        found = _score_matmul(g, node.input[0], frozen, depth + 1, caps)
        if found is not None:
            frozen.append(FrozenScale(node.name, 1, scale, constant=g.is_constant(scale)))
        return found
    if activation_qdq(g, node):  # not counted: a static QDQ model puts a pair after every op
        return _score_matmul(g, node.input[0], frozen, depth, caps)
    if node.op_type in ("Add", "Where", "Cast"):
        # Add: scores + mask; Where: masked_fill. Follow whichever input leads to the MatMul.
        candidates = node.input[1:] if node.op_type == "Where" else node.input
        for inp in candidates:
            before = len(frozen)
            found = _score_matmul(g, inp, frozen, depth + 1, caps)
            if found is not None:
                return found
            del frozen[before:]
    return None


def _soft_cap(g: ModelGraph, node: onnx.NodeProto) -> tuple[str, float] | None:
    """(s, cap) where `node` computes cap·tanh(s/cap) (Gemma 2's attention logit soft-capping:
    Mul by cap of Tanh of a Div by cap, or of a Mul by 1/cap); None otherwise."""
    if node.op_type != "Mul":
        return None
    constants = [g.constant(t) for t in node.input]
    at = next((i for i, c in enumerate(constants) if c is not None and c.size == 1), None)
    tanh = g.producer_of(node.input[1 - at]) if at is not None else None
    if tanh is None or tanh.op_type != "Tanh":
        return None
    cap = float(constants[at].reshape(-1)[0])
    inner = g.producer_of(tanh.input[0])
    if inner is None or inner.op_type not in ("Div", "Mul") or g.constant(inner.input[1]) is None:
        return None
    divisor = float(g.constant(inner.input[1]).reshape(-1)[0])
    divisor = divisor if inner.op_type == "Div" else 1.0 / divisor if divisor else 0.0
    return (inner.input[0], cap) if cap > 0 and abs(divisor - cap) <= 1e-6 * cap else None


def _probs_consumer(g: ModelGraph, probs: str) -> onnx.NodeProto:
    for _ in range(4):
        consumers = [c for c in g.consumers_of(probs) if c.op_type != "IsNaN"]
        if len(consumers) != 1:
            raise NoMatch("the attention probabilities have several readers")
        node = consumers[0]
        if node.op_type == "MatMul" and node.input[0] == probs:
            return node
        if node.op_type not in _PROBS_PASS and not activation_qdq(g, node):
            break
        probs = node.output[0]
    raise NoMatch("no attn·V MatMul after the softmax")

