"""Whole transformer blocks: an attention and the FFN after it, each joined to the residual
stream, pre-norm (x + f(LN(x))) or post-norm (LN(x + f(x)))."""
from __future__ import annotations

import onnx

from ..graph import ModelGraph
from .blocks import AttentionBlock, FfnBlock, Layer, common_scope


def match_layers(g: ModelGraph, attention: list[AttentionBlock], ffn: list[FfnBlock]) -> list[Layer]:
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
        name = common_scope(block.name + "/x", mlp.name + "/x") or block.name
        layers.append(Layer(name, block, mlp, stream_in, _joined(g, second, norm), norm))
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
