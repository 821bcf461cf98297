"""The reconstruction's half-blocks: where the graph is cut into transformer blocks, and what
each half (attention, then FFN) runs and captures on cached stream values."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np

from ..ir.graph import ModelGraph
from ..score.importance import query_key_tensors, rotary_tables
from .masking import Slot, Weights, attention_slots, ffn_slots
from ..match import Matches, NoMatch
from ..match.norms import branch_norm, rms_gain
from .segments import Segment, SegmentRunner, cut


# what a residual join may hold: the Add, norms around it (written out or as one op), casts
_JOIN_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "ReduceMean", "Cast", "LayerNormalization",
             "SimplifiedLayerNormalization", "RMSNormalization", "SkipLayerNormalization",
             "SkipSimplifiedLayerNormalization"}
_NORM_NODES = 2 * 11  # two written-out RMS/LayerNorms (a sandwich norm, then the next pre-norm)


@dataclass
class Half:
    segment: Segment
    runner: SegmentRunner
    join: SegmentRunner  # (branch, residual input) → the stream after the join
    branch: str  # the sublayer's output, added to the stream at the join
    residual: str  # the join's other input: the stream the sublayer read
    projection_inputs: SegmentRunner | None = None  # stream → the inputs of q and k (attention)
    branch_gain: tuple[np.ndarray, float] | None = None  # (γ, ε) of a norm on the branch before the Add
    # stream → the refitted layer's inputs (out projection, fc2) alone: what the refit's sums read
    # of the pruned half. onnxruntime runs every node of a session whatever outputs are asked for,
    # so the whole half would also run that layer and the join for nothing (a third of an FFN)
    layer_inputs: SegmentRunner | None = None

    @property
    def refit_inputs(self) -> SegmentRunner:
        """The runner the refit's pass reads (the refitted layer's inputs): `layer_inputs`, or the
        whole half where that part could not be cut on its own (_layer_inputs)."""
        return self.layer_inputs or self.runner


def plan_segments(g: ModelGraph, matches: Matches) -> list[tuple[Half, Half]]:
    """Attention and FFN halves of every transformer block, or NoMatch where the model cannot be
    cut into consecutive blocks (then the one-pass compensation is used)."""
    layers = matches.layers
    if not layers:
        why = matches.first_block_reason
        raise NoMatch(f"no transformer block (attention + FFN on a residual stream) was found{f'; {why}' if why else ''}")
    in_layers = {layer.attention for layer in layers} | {layer.ffn for layer in layers}
    loose = [b.name for b in matches.attention + matches.ffn if b not in in_layers]
    if loose:
        raise NoMatch(f"{loose[0]} is not part of a transformer block")
    for before, after in zip(layers, layers[1:]):
        if before.output != after.input:
            raise NoMatch(f"something runs between {before.name} and {after.name}")
    cuts = [layer.input for layer in layers] + [layer.middle for layer in layers] + [layers[-1].output]
    halves = []
    for layer in layers:
        slots = attention_slots(layer.attention) + ffn_slots(layer.ffn)
        pair = []
        block = layer.attention
        attention_capture = ([block.out.output, block.out.input] + query_key_tensors(block)
                             + [s.tensor for s in block.frozen_scales] + rotary_tables(g, block))
        for part, start, end, capture in (("attention", layer.input, layer.middle, attention_capture),
                                          ("ffn", layer.middle, layer.output, [layer.ffn.fc2.output, layer.ffn.fc2.input])):
            name = f"{layer.name} ({part})"
            segment = cut(g, name, [start], [end], cuts, slots)
            branch = capture[0]
            join = cut(g, f"{name} join", [branch, start], [end], cuts)
            # the legacy exporter routes a norm's weights through Identity nodes: they are no work;
            # Gemma 3 and OLMo 2 normalise the branch before the Add (a written-out RMSNorm); a static
            # QDQ model rounds the norm's weights through QDQ pairs (constants: its activation pairs
            # are bypassed while pruning, activation_ranges.py)
            work = [g.node(n).op_type for n in join.nodes
                    if g.node(n).op_type not in ("Identity", "Constant", "QuantizeLinear", "DequantizeLinear")]
            if len(work) > 3 + _NORM_NODES or join.slots or not set(work) <= _JOIN_OPS:
                raise NoMatch(f"{name}: the residual join is more than an Add and normalisations")
            gain = None
            if (norm := branch_norm(g, branch)) is not None and (gain := rms_gain(g, norm)) is None:
                raise NoMatch(f"{name}: the norm on its output before the residual Add is not an RMS norm")
            pair.append(Half(segment, SegmentRunner(g, segment, capture), SegmentRunner(g, join), branch, start,
                              branch_gain=gain, layer_inputs=_layer_inputs(g, name, start, capture[1], cuts, slots)))
        inputs = list(dict.fromkeys([block.q.input, block.k.input]))
        norm = cut(g, f"{layer.name} (q, k inputs)", [layer.input], inputs, cuts)
        if norm.slots or len([n for n in norm.nodes if g.node(n).op_type != "Constant"]) > 12:
            raise NoMatch(f"{layer.name}: more than a normalisation between the stream and q, k")
        pair[0].projection_inputs = SegmentRunner(g, norm) if norm.nodes or norm.renorms else None
        halves.append(tuple(pair))
    return halves


def _layer_inputs(g: ModelGraph, name: str, start: str, inputs: str, cuts: list[str], slots: list[Slot]
                  ) -> SegmentRunner | None:
    """The runner of `Half.layer_inputs`; None where that part cannot be cut on its own (the refit's
    pass then runs the whole half: Half.refit_inputs)."""
    try:
        return SegmentRunner(g, cut(g, f"{name} to its refitted layer", [start], [inputs], cuts, slots))
    except NoMatch:
        return None


def original_weights(g: ModelGraph, halves: list[tuple[Half, Half]]) -> dict[Slot, np.ndarray]:
    """The original value of every slot the half-blocks' segments read, decoded where asked
    (one half's slots at a time, each batch's run reading them again) and not kept."""
    return Weights(g, all_slots(halves)).values


def all_slots(halves: list[tuple[Half, Half]]) -> list[Slot]:
    return list(dict.fromkeys(s for a, f in halves for s in a.segment.slots + f.segment.slots))


@dataclass(frozen=True)
class Piece:
    """A runner's segment and captures without its graph: how a half-block travels to a worker."""

    segment: Segment
    capture: tuple[str, ...]


def detached(halves: list[tuple[Half, Half]]) -> list[tuple[Half, Half]]:
    """The halves with their runners as Pieces (picklable, no graph, no session): a worker
    attaches them to its own graph instead of cutting it again (which reads norms' weights)."""
    def piece(runner: SegmentRunner | None) -> Piece | None:
        return None if runner is None else Piece(runner.segment, runner.capture)

    return [tuple(replace(h, runner=piece(h.runner), join=piece(h.join), projection_inputs=piece(h.projection_inputs),
                          layer_inputs=piece(h.layer_inputs)) for h in pair) for pair in halves]


def attached(g: ModelGraph, halves: list[tuple[Half, Half]]) -> list[tuple[Half, Half]]:
    """Detached halves over `g` (a worker's graph of the same model)."""
    def runner(piece: Piece | None) -> SegmentRunner | None:
        return None if piece is None else SegmentRunner(g, piece.segment, piece.capture)

    return [tuple(replace(h, runner=runner(h.runner), join=runner(h.join), projection_inputs=runner(h.projection_inputs),
                          layer_inputs=runner(h.layer_inputs)) for h in pair) for pair in halves]


def runners(half: Half) -> list[SegmentRunner]:
    """Every onnxruntime runner a half holds (its half, join, q/k inputs, refit inputs; the ones
    it has): what owns a session and its weights."""
    return [r for r in (half.runner, half.join, half.projection_inputs, half.layer_inputs) if r is not None]


def drop_sessions(half: Half) -> None:
    """A half's onnxruntime sessions (and the weights they keep) dropped: built again if run again."""
    for runner in runners(half):
        runner.session = None


@contextmanager
def arenas(pair: tuple[Half, ...]) -> Iterator[None]:
    """The halves' sessions built inside keep onnxruntime's memory arena (SegmentRunner.arena),
    each for one pass over the batches (drop_arenas), and none is left on leaving (an exception
    included): for a layer's passes, whose sessions no later pass runs (a restarted run builds
    them again)."""
    every = [runner for half in pair for runner in runners(half)]
    for runner in every:
        runner.arena = True
    try:
        yield
    finally:
        for half in pair:
            drop_sessions(half)
        for runner in every:
            runner.arena = False


def drop_arenas(halves: list[tuple[Half, Half]]) -> None:
    """Every session that keeps an arena dropped, arena and all: after each pass over the batches.
    Each of a half's runners serves one pass of its layer (the targets, the refit's inputs, the
    join), so none is built more often than with the arenas held to the layer's end; held, they
    kept a run's worth of memory each through the refits and the later passes: SmolLM2-135M's
    576-window prune peaked 565 MB higher with a layer's arenas than without any (3f9064b)."""
    for pair in halves:
        for half in pair:
            for runner in runners(half):
                if runner.arena:
                    runner.session = None


def embeddings(g: ModelGraph, halves: list) -> tuple[Segment, list[str]]:
    """The segment before the first block (the first stream from the model inputs), and the side
    tensors it makes for the blocks (captured once, with the first stream)."""
    streams = [h.residual for pair in halves for h in pair]
    early = sorted({t for pair in halves for h in pair for r in (h.runner, h.join, h.projection_inputs, h.layer_inputs)
                    if r is not None for t in r.segment.side if g.producer_of(t).op_type != "Shape"})
    return cut(g, "embeddings", [], [halves[0][0].residual] + early, streams), early
