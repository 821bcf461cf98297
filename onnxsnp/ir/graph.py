"""Stage 2: an analysable view of the ONNX graph.

`ModelGraph` wraps the ModelProto with a networkx DiGraph of its nodes (an edge per tensor that
flows between two nodes), producer/consumer maps, constant resolution and static shapes. It
never edits the model: rewriting builds a new one.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property

import networkx as nx
import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from ..errors import SnpError
from . import external
from .sizes import raw_bytes
from .standins import replace_contrib_ops

# The legacy exporter de-duplicates identical initializers by routing one through Identity nodes.
_PASS_THROUGH = {"Identity"}


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (in place) so that nodes can be referred to by name."""
    used: set[str] = set()
    for index, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{index}"
        while name in used:
            name += "_"
        used.add(name)
        node.name = name


class ModelGraph:
    def __init__(self, model: onnx.ModelProto):
        name_nodes(model)
        self.model = model
        graph = model.graph
        self.nodes: dict[str, onnx.NodeProto] = {n.name: n for n in graph.node}
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.graph_outputs = [o.name for o in graph.output]
        self.producer: dict[str, str] = {}
        self.consumers: dict[str, list[str]] = {}
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node.name
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node.name)
        self.dag = nx.DiGraph()
        self.dag.add_nodes_from(self.nodes)
        for tensor, consumer_names in self.consumers.items():
            src = self.producer.get(tensor)
            if src is not None:
                for dst in consumer_names:
                    self.dag.add_edge(src, dst, tensor=tensor)
        if not nx.is_directed_acyclic_graph(self.dag):
            raise SnpError("the graph has a cycle; ONNX graphs must be acyclic")
        self._constants: dict[str, np.ndarray | None] = {}
        self._keep_above: int | None = None  # decoded constants this large are not kept (`decoding_once`)

    # --- structure -----------------------------------------------------------------------
    def node(self, name: str) -> onnx.NodeProto:
        return self.nodes[name]

    def producer_of(self, tensor: str) -> onnx.NodeProto | None:
        name = self.producer.get(tensor)
        return self.nodes[name] if name is not None else None

    def consumers_of(self, tensor: str) -> list[onnx.NodeProto]:
        return [self.nodes[n] for n in self.consumers.get(tensor, [])]

    def nodes_of_type(self, *op_types: str) -> list[onnx.NodeProto]:
        return [n for n in self.model.graph.node if n.op_type in op_types]

    def opset(self, domain: str = "") -> int:
        for op in self.model.opset_import:
            if op.domain in (domain, "ai.onnx" if domain == "" else domain):
                return op.version
        return 0

    # --- constants -----------------------------------------------------------------------
    def initializer_behind(self, tensor: str) -> str | None:
        """Name of the initializer that `tensor` is (directly or through Identity nodes)."""
        seen = set()
        while tensor not in self.initializers:
            node = self.producer_of(tensor)
            if node is None or node.op_type not in _PASS_THROUGH or tensor in seen:
                return None
            seen.add(tensor)
            tensor = node.input[0]
        return tensor

    def constant(self, tensor: str) -> np.ndarray | None:
        """The value of `tensor` if it is fixed at export time: an initializer (maybe behind
        Identity nodes) or a Constant node's output. None for anything computed at run time."""
        if tensor in self._constants:
            return self._constants[tensor]
        value: np.ndarray | None = None
        source = self.initializer_behind(tensor)
        if source is not None:
            value = self.initializer_value(source)
        else:
            node = self.producer_of(tensor)
            if node is not None and node.op_type == "Constant":
                value = _constant_node_value(node)
            elif node is not None and node.op_type in _FOLDABLE and len(node.output) == 1:
                inputs = [self.constant(t) if t else None for t in node.input]
                if all(v is not None for v, t in zip(inputs, node.input) if t):
                    value = _fold(node, inputs)
        if value is None or self._keep_above is None or value.nbytes < self._keep_above:
            self._constants[tensor] = value
        return value

    def initializer_value(self, name: str) -> np.ndarray:
        """Initializer `name` decoded (from the data file where lazy); a worker's graph, which
        holds one block's weights at a time, serves them from there (compensate/worker_graph.py)."""
        return external.to_array(self.initializers[name])

    @contextmanager
    def decoding_once(self, large_bytes: int = 2**20) -> Iterator[None]:
        """Within: constants of `large_bytes` or more are decoded for whoever asks and not kept
        (asked twice, decoded twice): initializers, and values folded from them (a quantized
        weight's DequantizeLinear, in float: four times its int8). The rewrite reads each weight
        it slices about once; kept, the decoded whole weights would sit beside their slices and
        the protobuf's own copy until the end of the rewrite."""
        before, self._keep_above = self._keep_above, large_bytes
        try:
            yield
        finally:
            self._keep_above = before

    def forget_constants(self) -> None:
        """Drop the decoded values (they are decoded again when asked for): the graph's
        initializers decoded once more are a second copy of the weights beside the protobuf's."""
        self._constants = {}

    def is_constant(self, tensor: str) -> bool:
        return self.constant(tensor) is not None

    # --- shapes --------------------------------------------------------------------------
    @cached_property
    def shapes(self) -> dict[str, tuple[int | None, ...]]:
        """Static shapes from ONNX shape inference; unknown dimensions are None."""
        try:
            inferred = shape_inference.infer_shapes(_without_weights(self.model), data_prop=True)
        except Exception:  # inference is a help, not a requirement; fall back to declared shapes
            inferred = self.model
        shapes: dict[str, tuple[int | None, ...]] = {}
        graph = inferred.graph
        for info in list(graph.input) + list(graph.value_info) + list(graph.output):
            tensor_type = info.type.tensor_type
            if tensor_type.HasField("shape"):
                shapes[info.name] = tuple(
                    d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
        for name, init in self.initializers.items():
            shapes[name] = tuple(init.dims)
        return shapes

    def dim(self, tensor: str, axis: int) -> int | None:
        shape = self.shapes.get(tensor)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        return shape[axis]


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A light copy for shape inference: big initializers become typed graph inputs, so models of
    any size are inferred without copying their weights; small (shape) constants stay; contrib
    ops are replaced by standard stand-ins of the same output shapes (`standins.py`)."""
    light = onnx.ModelProto()
    light.ir_version, light.producer_name = model.ir_version, model.producer_name
    light.opset_import.extend(model.opset_import)
    graph = light.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    declared = {i.name for i in model.graph.input}
    for tensor in model.graph.initializer:
        if raw_bytes(tensor) <= 4096:
            graph.initializer.append(external.inline(tensor))
        elif tensor.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    light.functions.extend(model.functions)
    known = {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
             for i in model.graph.input}  # declared input shapes (an op's KV cache tells its head size)
    replace_contrib_ops(graph, known | {t.name: list(t.dims) for t in model.graph.initializer})
    return light


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


# Ops whose output is itself a constant when all their inputs are (what an optimizer may have
# left unfolded: a scale computed from constants, a weight dequantized at run time).
_FOLDABLE = {"Cast", "Sqrt", "Reciprocal", "Neg", "Mul", "Div", "Add", "Sub", "Pow", "Transpose", "DequantizeLinear",
             "QuantizeLinear", "Gather", "Identity"}  # QuantizeLinear: a static QDQ model's constant scale passes a
# QDQ pair; Identity: one of its shared norm weights, quantized once and routed to each norm


def _fold(node: onnx.NodeProto, inputs: list[np.ndarray | None]) -> np.ndarray | None:
    """The value of `node` applied to constant inputs; None for what is not folded here."""
    op, first = node.op_type, inputs[0]
    if op == "Identity":
        return first
    if op == "Cast":
        return first.astype(onnx.helper.tensor_dtype_to_np_dtype(attribute(node, "to")))
    if op in ("Sqrt", "Reciprocal", "Neg"):
        return {"Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Neg": np.negative}[op](first)
    if op == "Transpose":
        return np.transpose(first, attribute(node, "perm", None))
    if op == "Gather":  # a rotary cache gathered to the pairs a layer keeps (decoding.py)
        return np.take(first, inputs[1], axis=attribute(node, "axis", 0))
    if op == "DequantizeLinear":
        return _dequantize(node, inputs)
    if op == "QuantizeLinear":
        return _quantize(node, inputs)
    if op == "Div" and not np.issubdtype(first.dtype, np.floating):
        return None  # integer division truncates in ONNX, floors in numpy
    if op == "Pow":
        return np.power(first, inputs[1]).astype(first.dtype)
    return {"Mul": np.multiply, "Div": np.divide, "Add": np.add, "Sub": np.subtract}[op](first, inputs[1])


def _dequantize(node: onnx.NodeProto, inputs: list[np.ndarray | None]) -> np.ndarray | None:
    """(x − zero point) · scale, per tensor or per channel along `axis` (blocked scales are not folded)."""
    x, scale = inputs[0], inputs[1]
    zero = inputs[2] if len(inputs) > 2 and inputs[2] is not None else np.zeros((), x.dtype)
    if attribute(node, "block_size", 0) or scale.ndim > 1:
        return None
    if scale.size > 1:
        shape = [1] * x.ndim
        shape[attribute(node, "axis", 1)] = scale.size
        scale = scale.reshape(shape)
        zero = zero.reshape(shape) if zero.size > 1 else zero  # an absent zero point is one zero for all
    return ((x.astype(np.int64) - zero.astype(np.int64)) * scale).astype(scale.dtype)


def _quantize(node: onnx.NodeProto, inputs: list[np.ndarray | None]) -> np.ndarray | None:
    """round(x / scale) + zero point, saturated to the zero point's integer type (uint8 without
    one); per tensor only (ties to even, as ONNX and numpy both round)."""
    x, scale = inputs[0], inputs[1]
    zero = inputs[2] if len(inputs) > 2 and inputs[2] is not None else np.zeros((), np.uint8)
    if scale.size != 1 or zero.size != 1 or not np.issubdtype(zero.dtype, np.integer) or \
            attribute(node, "output_dtype", 0) or attribute(node, "saturate", 1) != 1:
        return None
    info = np.iinfo(zero.dtype)
    return np.clip(np.round(x / scale) + zero.astype(np.int64), info.min, info.max).astype(zero.dtype)


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default
