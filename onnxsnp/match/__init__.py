"""Stage 3: find the attention and FFN blocks that can be pruned.

Attention is found by rules (`rules.py`), one per anchor op — a Softmax over Q·Kᵀ, the ONNX
`Attention` op, onnxruntime's contrib attention ops — each reading the core of the attention;
`attention.py` assembles the block: `tracing.py` follows Q, K and V back to their projections
and attn·V forward to the output projection, `layout.py` follows the head axes through the
reshapes in between, `linear.py` recognises projections, `ffn.py` FFNs and `layers.py` whole
transformer blocks. Every fact the rewriter needs ends up in a frozen dataclass of `blocks.py`
(built once; later stages key dicts by it); a candidate that does not fit is reported as
skipped, with the reason, and never pruned.
"""
from __future__ import annotations

from ..ir.graph import ModelGraph
from .blocks import (AttentionBlock, AttentionForm, FfnBlock, FrozenScale, FusedQkv, Layer, Linear, Matches, NoMatch,
                     Placement, ShapeEdit, Skipped, Width, unique_names)
from .ffn import match_ffns
from .layers import match_layers
from .linear import linear_at, linear_producing, linear_reading
from .rules import ATTENTION_RULES, AttentionRule, RuleSet

__all__ = ["AttentionBlock", "AttentionForm", "AttentionRule", "FfnBlock", "FrozenScale", "FusedQkv", "Layer", "Linear",
           "Matches", "NoMatch", "Placement", "RuleSet", "ShapeEdit", "Skipped", "Width", "find_blocks", "linear_at",
           "linear_producing", "linear_reading"]


def find_blocks(g: ModelGraph, rules: RuleSet = ATTENTION_RULES) -> Matches:
    attention, skipped = rules.match(g)
    attention_linears = {n for block in attention for n in (block.q.node, block.k.node, block.v.node, block.out.node)}
    ffn, ffn_skipped = match_ffns(g, attention_linears)
    attention, ffn = unique_names(attention), unique_names(ffn)
    layers, unpaired = match_layers(g, attention, ffn)
    # a candidate that failed one way but was found another (fc1 tried as an fc2) is not skipped
    found = attention_linears | {b.anchor for b in attention} | {n for b in ffn for n in (b.fc1.node, b.fc2.node)} \
        | {b.gate.node for b in ffn if b.gate is not None}
    skipped = [s for s in skipped + ffn_skipped if s.where not in found]
    return Matches(tuple(attention), tuple(ffn), tuple(skipped + unpaired), tuple(layers))
