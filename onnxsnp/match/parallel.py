"""Parallel transformer blocks (Phi-1.5/Phi-2, GPT-J, GPT-NeoX with use_parallel_residual):
x + attn(LN(x)) + mlp(LN(x)), both halves reading one normed input and both added to the stream.

Their attention and FFN units are pruned like any others (each half's cut is private to it), but
a whole block is not a sequence of two halves joined to the stream one after the other: the
whole-block removal and the block-by-block refit (compensate/halves.py) do not model it, so such
a block is named and skipped as a whole, with the reason `inspect` shows.
"""
from __future__ import annotations

from ..ir.graph import ModelGraph
from .blocks import AttentionBlock, FfnBlock


def parallel_reason(g: ModelGraph, block: AttentionBlock, ffn: list[FfnBlock]) -> str | None:
    """Why `block` is no whole sequential block, where an FFN reads its q projection's input and
    the two outputs are summed (through any bias Adds) before or into the stream; None otherwise."""
    mlp = next((f for f in ffn if f.fc1.input == block.q.input), None)
    if mlp is None:
        return None
    if not _reach(g, block.out.output) & _reach(g, mlp.fc2.output):
        return None
    return (f"a parallel block: attention and FFN {mlp.fc1.node} both read {block.q.input} "
            "(x + attn(LN(x)) + mlp(LN(x))); whole-block removal and the block-by-block refit need sequential ones")


def _reach(g: ModelGraph, tensor: str, depth: int = 3) -> set[str]:
    """The Add nodes within `depth` Adds downstream of `tensor` (where two branches meet)."""
    found: set[str] = set()
    frontier = [tensor]
    for _ in range(depth):
        after = [n for t in frontier for n in g.consumers_of(t) if n.op_type == "Add"]
        found |= {n.name for n in after}
        frontier = [n.output[0] for n in after]
    return found
