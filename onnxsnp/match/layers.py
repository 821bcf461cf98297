"""Whole transformer blocks: an attention and the FFN after it, each joined to the residual
stream, pre-norm (x + f(LN(x))) or post-norm (LN(x + f(x))); the norm may be an op or written
out, and a LayerScale Mul may sit between a sub-block and its join. An attention that cannot
be paired says why (`inspect` lists it), so that `--blocks` never fails silently."""
from __future__ import annotations

import onnx

from ..ir.graph import ModelGraph, attribute
from .blocks import AttentionBlock, Candidate, FfnBlock, Layer, NoMatch, Placement, Skipped, common_scope
from .norms import channel_scale, normalized
from .parallel import parallel_reason

_SKIP_NORMS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")


def match_layers(g: ModelGraph, attention: list[AttentionBlock], ffn: list[FfnBlock]) -> tuple[list[Layer], list[Skipped]]:
    """Pair each attention with the FFN after it through their residual joins."""
    by_input = {block.fc1.input: block for block in ffn}
    layers, skipped = [], []
    for block in attention:
        try:
            layers.append(_layer(g, block, by_input))
        except NoMatch as why:
            reason = parallel_reason(g, block, ffn) or str(why)
            skipped.append(Skipped(block.name, Candidate.BLOCK, f"not removable as a whole block: {reason}"))
    return layers, skipped


def _layer(g: ModelGraph, block: AttentionBlock, by_input: dict[str, FfnBlock]) -> Layer:
    stream_in, first, sandwiched = _residual_join(g, block.out.output, block.out.node)
    # pre-norm blocks read LN(x); post-norm blocks read x and normalise after the join; OLMo 2
    # reads x and normalises each sub-block's output before adding it (x + LN(f(x))), like pre
    if block.q.input == _normalized(g, stream_in) or block.q.input == stream_in and sandwiched:
        norm = Placement.PRE
    elif block.q.input == stream_in:
        norm = Placement.POST
    else:
        raise NoMatch(f"{block.q.node} reads neither the stream it is added to nor that stream normalised")
    after_attention = _joined(g, first, norm)
    mlp = by_input.get(after_attention if norm is Placement.POST else _normalized(g, after_attention) or "")
    if mlp is None and sandwiched:
        mlp = by_input.get(after_attention)
    if mlp is None:
        raise NoMatch(f"no FFN reads the stream after the attention ({after_attention})")
    into, second, _ = _residual_join(g, mlp.fc2.output, mlp.fc2.node)
    if into != after_attention:
        raise NoMatch(f"{mlp.name} is added to {into}, not to the stream after the attention")
    name = common_scope(block.name + "/x", mlp.name + "/x") or block.name
    renorm = second.name if second.op_type in _SKIP_NORMS and norm is Placement.PRE else ""
    return Layer(name, block, mlp, stream_in, _joined(g, second, norm), norm, after_attention, renorm)


def _residual_join(g: ModelGraph, branch: str | None, writer: str) -> tuple[str, onnx.NodeProto, bool]:
    """(stream in, joining node, whether a norm came first) where a sub-block's output — maybe
    through a LayerScale Mul or a norm of its own (Gemma 3, OLMo 2) — is added to the residual
    stream: Add(x, f), or SkipLayerNormalization(f, x), which adds and normalises in one op."""
    readers = g.consumers_of(branch) if branch else []
    sandwiched = False
    for _ in range(8):
        single = readers[0] if len(readers) == 1 else None
        if single is not None and channel_scale(g, single, branch) is not None:  # LayerScale
            branch = single.output[0]
        elif single is not None and single.op_type == "Cast" and attribute(single, "to") in _FLOATS:  # compute type
            branch = single.output[0]
        elif single is None or single.op_type not in ("Add",) + _SKIP_NORMS:
            norm = normalized(g, branch)
            if norm is None:
                break
            branch, sandwiched = norm, True
        else:
            break
        readers = g.consumers_of(branch)
    if len(readers) != 1 or readers[0].op_type not in ("Add",) + _SKIP_NORMS:
        raise NoMatch(f"the output of {writer} goes to {[r.op_type for r in readers]}, not to a residual Add")
    others = [t for t in readers[0].input[:2] if t != branch]
    if len(others) != 1 or g.is_constant(others[0]):
        raise NoMatch(f"{readers[0].name} does not add the output of {writer} to a stream")
    return others[0], readers[0], sandwiched


def _joined(g: ModelGraph, join: onnx.NodeProto, norm: Placement) -> str:
    """The stream after a join: the Add's output (pre-norm) or the normalised sum (post-norm)."""
    if join.op_type in _SKIP_NORMS:
        if norm is Placement.POST:
            return join.output[0]
        if len(join.output) > 3 and join.output[3]:  # pre-norm: the sum is its output 3
            return join.output[3]
        raise NoMatch(f"{join.name} adds to the stream and normalises in one op without writing the sum, "
                      "so the stream after the block is no tensor")
    if norm is Placement.PRE:
        return past_cast(g, join.output[0])
    after = normalized(g, join.output[0])
    if after is None:
        raise NoMatch(f"the sum {join.output[0]} of a post-norm block is not normalised")
    return after


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def past_cast(g: ModelGraph, stream: str) -> str:
    """The stream as the next block reads it: through a Cast to a float type that is its only
    reader (optimum's Llama exports cast the stream before every norm, and add the cast)."""
    readers = g.consumers_of(stream)
    if len(readers) == 1 and readers[0].op_type == "Cast" and attribute(readers[0], "to") in _FLOATS \
            and stream not in g.graph_outputs:
        return readers[0].output[0]
    return stream


def _normalized(g: ModelGraph, stream: str) -> str | None:
    """The normalised `stream`: the output of the one norm (op or written out) reading it, or of
    the SkipLayerNormalization whose sum (output 3) it is."""
    producer = g.producer_of(stream)
    if producer is not None and producer.op_type in _SKIP_NORMS and list(producer.output).index(stream) == 3:
        return producer.output[0]
    return normalized(g, stream)
