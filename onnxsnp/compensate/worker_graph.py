"""What a `--workers` worker holds of the model: its graph without the weights, and the weights
of the one half-block it is running (docs/SCALING.md, "What is sent where").

The driver sends each worker, once, the model's protobuf with every initializer of
`HELD_MIN_BYTES` or more left as a stub (`weightless`), its blocks as it matched them, and its
half-blocks as it cut them (halves.detached): nothing a worker would have to decode weights to
recompute. Before a half-block's first pass it sends the values of the stubs that half's
segments read (`half_reads`, the same names the driver computes for every half), and the worker
drops them and the half's onnxruntime sessions after the half's last pass. A worker's graph
(`BlockGraph`) serves constants from the half it holds; a stub asked for outside it is an error
naming it, never a value read from somewhere else.
"""
from __future__ import annotations

import onnx
import numpy as np

from ..data.calibration import _IN_MEMORY_TYPES as SESSION_TYPES, without_initializers
from ..errors import SnpError
from ..ir import external
from ..ir.graph import ModelGraph
from ..ir.sizes import raw_bytes
from .segments import Segment

# initializers this large are held one half-block at a time; smaller ones (shape constants,
# scalars, a small model's norms) travel in the protobuf, where a per-block round trip would cost
# more than they weigh
HELD_MIN_BYTES = 1024
# a stub's marker: an absolute location no reader may open (external.is_lazy takes it for a lazy
# stub, so that sessions ask the graph for its value; a reader going to the file fails loudly)
_NOWHERE = "/onnxsnp-worker/held-by-the-driver"


def weightless(model: onnx.ModelProto) -> tuple[bytes, frozenset[str]]:
    """`model`'s protobuf with its initializers of HELD_MIN_BYTES or more as stubs (name, type,
    dims, declared length), and those initializers' names."""
    light = without_initializers(model)
    held = set()
    for tensor in model.graph.initializer:
        size = raw_bytes(tensor) if tensor.HasField("raw_data") or external.is_lazy(tensor) else 0
        # a session asks the graph for these types' values (calibration.add_initializers); others stay
        if size >= HELD_MIN_BYTES and tensor.data_type in SESSION_TYPES:
            stub = light.graph.initializer.add()  # keeps the initializers' order
            stub.name, stub.data_type = tensor.name, tensor.data_type
            stub.dims.extend(tensor.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            stub.external_data.add(key="location", value=_NOWHERE)
            stub.external_data.add(key="length", value=str(size))
            held.add(tensor.name)
        else:
            light.graph.initializer.add().CopyFrom(external.inline(tensor))
    return light.SerializeToString(), frozenset(held)


def segment_reads(g: ModelGraph, segments: list[Segment | None], among: frozenset[str]) -> list[str]:
    """The initializers of `among` that `segments` read, in their readers' order: what a worker
    needs to run them (their nodes' inputs, a renormalised Skip…Normalization's γ and β
    included), whether fed as a slot or kept by the session."""
    names: dict[str, None] = {}
    for segment in segments:
        if segment is None:
            continue
        for node in segment.renorms + segment.nodes:
            names.update((t, None) for t in g.node(node).input if t in among)
    return list(names)


def half_reads(g: ModelGraph, half, among: frozenset[str]) -> list[str]:
    """What a half-block's passes read of `among` (its runner, residual join and the inputs of
    q and k): its weights, its norms' and biases', a rotary embedding's tables. The Python-side
    reads of a block's weights (importance.query_key's q and k) are of weights its nodes read."""
    return segment_reads(g, [r.segment if r is not None else None
                             for r in (half.runner, half.join, half.projection_inputs)], among)


def values(g: ModelGraph, names: list[str]) -> dict[str, np.ndarray]:
    """The driver's values of `names`, decoded for sending (the driver's graph keeps none)."""
    return {name: g.initializer_value(name) for name in names}


class BlockGraph(ModelGraph):
    """A worker's graph: the model's structure and small initializers; the stubs' values are
    those of the half-block held (`hold`)."""

    def __init__(self, light: bytes, held: frozenset[str]):
        super().__init__(onnx.load_from_string(light))
        self.held_names = held
        self.block: dict[str, np.ndarray] = {}

    def hold(self, weights: dict[str, np.ndarray]) -> None:
        """The stubs' values from now on (the previous block's, and what was folded from them,
        dropped)."""
        self.block = weights
        self._constants = {}

    def initializer_value(self, name: str) -> np.ndarray:
        if name not in self.held_names:
            return super().initializer_value(name)
        if name not in self.block:
            raise SnpError(f"a worker was asked for {name}, a weight not sent with the half-block it "
                           "runs (compensate/worker_graph.py)")
        return self.block[name]

    def held_bytes(self) -> int:
        """Bytes of the model's large initializers this graph holds now (the protobuf keeps none)."""
        return sum(v.nbytes for v in self.block.values())
