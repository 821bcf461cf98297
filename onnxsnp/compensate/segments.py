"""Running a piece of the graph on its own: one transformer half-block on cached inputs.

The block-by-block reconstruction feeds each block the pruned model's own activations. Running
the whole model once per block would cost one pass per block; instead the graph is cut at the
residual-stream tensors between blocks and each piece runs as its own onnxruntime session on
cached stream values, so the whole job costs about two passes over the data.

A `Segment` is everything needed to compute its outputs from its inputs: found backwards from
the outputs, stopping at the inputs, the model inputs and the constants. The weights a plan may
change (`masking.Slot`s) become inputs of the segment's session, so one session serves every
trial set of weights. A segment may not read another cut's stream tensor — except through
Shape, whose (small) output is then captured once from the full model ("side" tensors).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..data.calibration import Weights as ConstantSource, add_initializers, light_session
from ..errors import SnpError
from ..ir.graph import ModelGraph
from .masking import Slot
from ..match import NoMatch


@dataclass(frozen=True)
class Segment:
    name: str
    inputs: tuple[str, ...]  # stream tensors, fed from the caches
    outputs: tuple[str, ...]
    nodes: tuple[str, ...]  # in graph order
    # computed elsewhere: Shape outputs of other cuts' tensors (from the cached shapes), and tensors
    # made by a node that also makes a cut tensor (e.g. EmbedLayerNormalization's mask index)
    side: tuple[str, ...]
    model_inputs: tuple[str, ...]  # graph inputs read directly (e.g. the attention mask)
    slots: tuple[Slot, ...]  # weights fed at run time
    # Skip(Simplified)LayerNormalization joins whose sum (output 3) is an input: their normalised
    # output is recomputed from the sum (the join itself belongs to the segment before)
    renorms: tuple[str, ...] = ()


def slot_name(slot: Slot) -> str:
    return f"onnxsnp::slot::{slot[0]}::{slot[1]}"


def cut(g: ModelGraph, name: str, inputs: Iterable[str], outputs: Iterable[str], foreign: Iterable[str] = (),
        slots: Iterable[Slot] = ()) -> Segment:
    """The segment computing `outputs` from `inputs`. `foreign`: stream tensors of other cuts,
    which the segment may read only through Shape. Raises NoMatch with the reason."""
    inputs, outputs = tuple(dict.fromkeys(inputs)), tuple(dict.fromkeys(outputs))
    foreign = set(foreign) - set(inputs) - set(outputs)
    graph_inputs = {i.name for i in g.model.graph.input} - set(g.initializers)
    nodes: set[str] = set()
    side: set[str] = set()
    model_inputs: set[str] = set()
    renorms: set[str] = set()
    frontier, seen = list(outputs), set(inputs)
    while frontier:
        tensor = frontier.pop()
        if not tensor or tensor in seen:
            continue
        seen.add(tensor)
        if tensor in g.initializers:
            continue
        if tensor in graph_inputs:
            model_inputs.add(tensor)
            continue
        if tensor in foreign:
            raise NoMatch(f"{name} reads {tensor}, the residual stream of another block, other than by its shape")
        producer = g.producer_of(tensor)
        if producer is None:
            raise NoMatch(f"{name}: nothing produces {tensor}")
        if producer.op_type == "Shape" and producer.input[0] in foreign:
            side.add(tensor)
            continue
        if producer.op_type in _SKIP_NORMS and tensor == producer.output[0] and len(producer.output) > 3 \
                and producer.output[3] in inputs:
            renorms.add(producer.name)
            frontier.extend(producer.input[2:_SKIP_NORMS[producer.op_type]])  # γ (and β)
            continue
        if any(out in foreign or out in inputs for out in producer.output):
            side.add(tensor)
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in producer.attribute):
            raise NoMatch(f"{name} contains control flow ({producer.op_type} {producer.name})")
        nodes.add(producer.name)
        frontier.extend(producer.input)
    ordered = tuple(n.name for n in g.model.graph.node if n.name in nodes)
    used = {slot for slot in slots if slot[0] in nodes}
    return Segment(name, inputs, outputs, ordered, tuple(sorted(side)), tuple(sorted(model_inputs)),
                   tuple(sorted(used)), tuple(sorted(renorms)))


_SKIP_NORMS = {"SkipLayerNormalization": 4, "SkipSimplifiedLayerNormalization": 3}  # → end of its γ, β inputs


def renormalized(node: onnx.NodeProto) -> onnx.NodeProto:
    """A Skip…Normalization's normalised output, computed from its sum (output 3) alone."""
    simplified = node.op_type == "SkipSimplifiedLayerNormalization"
    epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    return helper.make_node("SimplifiedLayerNormalization" if simplified else "LayerNormalization",
                            [node.output[3], *node.input[2:_SKIP_NORMS[node.op_type]]], [node.output[0]],
                            name=f"{node.name}/renormalized", axis=-1, epsilon=epsilon)


class SegmentRunner:
    """One onnxruntime session over a segment, built on the first run (when the feed tells the
    input types), reused for every batch and every set of slot weights."""

    def __init__(self, g: ModelGraph, segment: Segment, capture: Iterable[str] = (),
                 constants: ConstantSource | None = None):
        self.g, self.segment = g, segment
        self.capture = tuple(dict.fromkeys(tuple(segment.outputs) + tuple(capture)))
        self.constants = constants or g.constant
        self.session = None
        # whether a session built from now on keeps onnxruntime's memory arena (a run's worth of
        # memory, for as long as the session lives): set by an owner that drops the session soon
        # (Reconstructor.run, per layer). Without it every large buffer of every run is a fresh
        # mapping (heap.fix_mmap_threshold), page-faulted in and zeroed again: SmolLM2-135M's halves
        # on batches of 32 windows of 128 tokens took 12-30 % more CPU time so
        self.arena = False

    def run(self, feed: dict[str, np.ndarray], weights: dict[Slot, np.ndarray], tensors: Iterable[str] | None = None
            ) -> dict[str, np.ndarray]:
        """`feed`: the segment's inputs, side tensors and model inputs (more is fine);
        `weights`: a value for every slot of the segment."""
        segment = self.segment
        values = {name: feed[name] for name in segment.inputs + segment.side + segment.model_inputs}
        values.update({slot_name(slot): weights[slot] for slot in segment.slots})
        if self.session is None:
            self.session = self._build(values)
        wanted = list(tensors) if tensors is not None else list(self.capture)
        try:
            result = self.session.run(wanted, values)
        except Exception as exc:
            raise SnpError(f"onnxruntime failed on {segment.name}: {str(exc).strip().splitlines()[0][:300]}") from None
        # copies: onnxruntime's outputs are views that pin its memory arena, and the reconstruction
        # keeps streams of every batch (views would grow the arena by a run's worth per batch)
        return {name: np.array(value) for name, value in zip(wanted, result)}

    def _build(self, values: dict[str, np.ndarray]):
        g, segment = self.g, self.segment
        model = onnx.ModelProto()
        model.ir_version = g.model.ir_version
        model.opset_import.extend(g.model.opset_import)
        model.functions.extend(g.model.functions)
        graph = model.graph
        graph.name = segment.name
        slot_inputs = {slot: slot_name(slot) for slot in segment.slots}
        read: list[str] = []
        for node_name in segment.renorms:
            node = graph.node.add()
            node.CopyFrom(renormalized(g.node(node_name)))
            read += [t for t in node.input if t]
        for node_name in segment.nodes:
            node = graph.node.add()
            node.CopyFrom(g.node(node_name))
            for index, tensor in enumerate(node.input):
                if (node_name, index) in slot_inputs:
                    node.input[index] = slot_inputs[(node_name, index)]
                elif tensor:
                    read.append(tensor)
        for name, value in values.items():
            graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), None))
        initializers = [g.initializers[t] for t in dict.fromkeys(read) if t in g.initializers]
        names, ort_values = add_initializers(graph, initializers, lambda t: self.constants(t))
        graph.output.extend(helper.make_empty_tensor_value_info(t) for t in self.capture)
        try:
            return light_session(model, names, ort_values, segment=True, arena=self.arena)
        except Exception as exc:
            raise SnpError(f"onnxruntime cannot run {segment.name} on its own: "
                           f"{str(exc).strip().splitlines()[0][:300]}") from None
