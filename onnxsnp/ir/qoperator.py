"""QOperator models (onnxruntime's quantize_static with QuantFormat.QOperator) read as static QDQ.

Each QLinear op computes a float op on dequantized integer inputs and quantizes its output:

    QLinearMatMul(a, a_scale, a_zero, b, b_scale, b_zero, y_scale, y_zero)
        ≡ QuantizeLinear(MatMul(DequantizeLinear(a), DequantizeLinear(b)), y_scale, y_zero)

and likewise QLinearAdd, QLinearMul, QLinearSoftmax, QLinearConcat, QLinearConv and QGemm (whose
int32 bias is dequantized with a_scale·b_scale). Ops that only move integers (Reshape, Transpose,
Split, an embedding's Gather…) keep their input's scale, so they are the same float op between a
DequantizeLinear and a QuantizeLinear with that scale — the form quantize_static's QDQ format
writes. `qdq_view` rewrites the model that way; pruning then takes the static QDQ path
(data/activation_ranges.py: activation pairs bypassed, put back and calibrated again; quantized.py:
integer weights sliced or quantized again with their scheme), and `QOperatorView.fuse` turns every
rewritten pattern back into its QLinear op (qoperator_fuse.py), so the written file is in QOperator
form again. The rewrite is exact: on onnxruntime the view computes what the QLinear kernels do, up
to their integer rounding of the rescale. Any QLinear op or reader of an integer tensor outside
these is refused naming the node, before anything is pruned.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .dynamic import _in_order
from ..errors import SnpError


@dataclass(frozen=True)
class QLinearSpec:
    """Where the parts of one kind of QLinear op are, and the float op it stands for."""

    float_op: str
    quantized: tuple[int, ...]  # the first input of each (integer, scale, zero point) triple
    output: int | None  # the output's scale (its zero point follows); None: a float output
    bias: int | None = None  # an int32 bias input
    weight_axis: int = 1  # the output channels of an integer weight (a per-channel scale runs along it)
    kept_attributes: tuple[str, ...] = ()  # attributes the float op takes as they are


SPECS: dict[str, QLinearSpec] = {
    "QLinearMatMul": QLinearSpec("MatMul", (0, 3), 6),
    "QLinearAdd": QLinearSpec("Add", (0, 3), 6),
    "QLinearMul": QLinearSpec("Mul", (0, 3), 6),
    "QLinearSoftmax": QLinearSpec("Softmax", (0,), 3, kept_attributes=("axis",)),
    "QLinearConv": QLinearSpec("Conv", (0, 3), 6, bias=8, weight_axis=0,
                               kept_attributes=("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")),
    "QGemm": QLinearSpec("Gemm", (0, 3), 7, bias=6, kept_attributes=("transA", "transB")),
    "QLinearConcat": QLinearSpec("Concat", (), 0, kept_attributes=("axis",)),  # triples from input 2 on
    # com.microsoft QLinearSigmoid(X, X_scale, X_zero, Y_scale, Y_zero): a SwiGLU's gate (decoder LMs)
    "QLinearSigmoid": QLinearSpec("Sigmoid", (0,), 3),
}

# ops that only move or select integers: the output keeps the input's scale and zero point
MOVING = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Split", "Gather", "Slice", "Expand", "Identity"}
_INTEGER_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


def triples(node: onnx.NodeProto) -> list[int]:
    """The first input of each quantized (integer, scale, zero point) triple of a QLinear op."""
    if node.op_type == "QLinearConcat":
        return list(range(2, len(node.input), 3))
    return [i for i in SPECS[node.op_type].quantized if i < len(node.input) and node.input[i]]


def output_params(node: onnx.NodeProto) -> tuple[str, str] | None:
    at = SPECS[node.op_type].output
    if at is None or len(node.input) <= at or not node.input[at]:
        return None
    return node.input[at], node.input[at + 1] if len(node.input) > at + 1 else ""


@dataclass(frozen=True)
class Rewritten:
    """One QLinear op of the input and the float op that stands for it in the view."""

    original: onnx.NodeProto  # its float op in the view has its name
    zero_types: tuple[str, ...]  # the integer type of each quantized input (its zero point's), by numpy name


@dataclass
class QOperatorView:
    """The model as static QDQ, and what turns it back into QOperator form."""

    model: onnx.ModelProto
    rewritten: dict[str, Rewritten]  # by name (the QLinear op's and its float op's)
    # turned back by qoperator_fuse.fused(view, pruned), which imports this module (not the reverse: no cycle)


def qdq_view(model: onnx.ModelProto) -> QOperatorView | None:
    """`model` rewritten as static QDQ (module docstring); None where it has no QLinear op.
    Raises SnpError naming the first node it cannot rewrite exactly."""
    graph = model.graph
    if not any(n.op_type in SPECS and n.domain in ("", "ai.onnx", "com.microsoft") for n in graph.node):
        return None
    _refuse_unknown(model)
    initializers = {t.name: t for t in graph.initializer}
    params = _integer_params(model, initializers)
    view = onnx.ModelProto()
    view.CopyFrom(model)
    del view.graph.node[:]
    used = {t for n in graph.node for t in (*n.input, *n.output)} | {i.name for i in graph.input}
    names = _Names(used)
    nodes: list[onnx.NodeProto] = []
    dequantized: dict[tuple[str, str, str, int | None], str] = {}  # (integer, scale, zero, axis) → float tensor
    # DequantizeLinear nodes already there are the float tensors of what they read
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[0] not in initializers:
            dequantized.setdefault((*node.input, None), node.output[0])

    def dequantize(tensor: str, scale: str, zero: str, axis: int | None = None) -> str:
        key = (tensor, scale, zero, axis)
        if key not in dequantized:
            out = names.fresh(f"{_stem(tensor)}_dequantized")
            attributes = {} if axis is None else {"axis": axis}
            nodes.append(helper.make_node("DequantizeLinear", [tensor, scale] + ([zero] if zero else []), [out],
                                          name=f"{out}/DequantizeLinear", **attributes))
            dequantized[key] = out
        return dequantized[key]

    rewritten = {}
    duplicates = {}  # a second DequantizeLinear of the same tensor: its readers read the first one's output
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[0] not in initializers:
            first = dequantized[(*node.input, None)]
            if first != node.output[0]:
                duplicates[node.output[0]] = first
                continue
            nodes.append(_copy(node))
        elif node.op_type in SPECS:
            _rewrite(node, initializers, names, nodes, dequantize, rewritten)
        elif node.op_type in MOVING and node.input and node.input[0] in params:
            scale, zero = params[node.input[0]]
            copy = _copy(node)
            copy.input[0] = dequantize(node.input[0], scale, zero)
            quantizes = []
            for index, output in enumerate(node.output):
                copy.output[index] = names.fresh(f"{_stem(output)}_float")
                out_scale, out_zero = params.get(output, (scale, zero))
                quantizes.append(helper.make_node("QuantizeLinear", [copy.output[index], out_scale, out_zero], [output],
                                                  name=f"{node.name}/quantize_{index}"))
            nodes += [copy, *quantizes]
        elif node.op_type == "Shape" and node.input[0] in params:
            # a shape is the same read from the float tensor, which keeps the integer one read
            # only by its DequantizeLinear (an activation pair)
            copy = _copy(node)
            copy.input[0] = dequantize(node.input[0], *params[node.input[0]])
            nodes.append(copy)
        else:
            nodes.append(_copy(node))
    for node in nodes:
        for index, tensor in enumerate(node.input):
            node.input[index] = duplicates.get(tensor, tensor)
    view.graph.node.extend(_in_order(nodes))
    view.graph.initializer.extend(names.initializers)
    return QOperatorView(view, rewritten)


def _rewrite(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], names: "_Names",
             nodes: list[onnx.NodeProto], dequantize, rewritten: dict[str, Rewritten]) -> None:
    """Append the float op standing for QLinear `node` between DequantizeLinear and QuantizeLinear."""
    spec = SPECS[node.op_type]
    inputs = []
    for index, first in enumerate(triples(node)):
        tensor, scale, zero = node.input[first:first + 3]
        axis = None
        if tensor in initializers and _size(initializers.get(scale)) > 1:
            axis = spec.weight_axis
            if node.op_type == "QGemm":  # B is [K, N], or [N, K] with transB
                axis = 0 if _attribute(node, "transB", 0) else 1
        inputs.append(dequantize(tensor, scale, zero, axis))
    if spec.bias is not None and len(node.input) > spec.bias and node.input[spec.bias]:
        inputs.append(_bias(node, initializers, names, nodes))
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in spec.kept_attributes}
    out_params = output_params(node)
    output = node.output[0]
    float_out = names.fresh(_stem(output)) if out_params is not None else output
    nodes.append(helper.make_node(spec.float_op, inputs, [float_out], name=node.name, **attributes))
    if out_params is not None:
        nodes.append(helper.make_node("QuantizeLinear", [float_out, *[p for p in out_params if p]], [output],
                                      name=f"{node.name}/quantize"))
    zero_types = tuple(str(numpy_helper.to_array(initializers[node.input[first + 2]]).dtype)
                       if node.input[first + 2] in initializers else "uint8" for first in triples(node))
    rewritten[node.name] = Rewritten(_copy(node), zero_types)


def _bias(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], names: "_Names",
          nodes: list[onnx.NodeProto]) -> str:
    """The float bias of a QLinearConv or QGemm: its int32 values in units of a_scale·b_scale."""
    spec = SPECS[node.op_type]
    bias, a_scale, b_scale = node.input[spec.bias], node.input[1], node.input[4]
    if any(t not in initializers for t in (bias, a_scale, b_scale)):
        raise SnpError(f"{node.op_type} node {node.name}: its bias or scales are not constants")
    scale = (numpy_helper.to_array(initializers[a_scale]) * numpy_helper.to_array(initializers[b_scale])).reshape(-1)
    scale_name = names.fresh(f"{node.name}/bias_scale")
    names.initializers.append(numpy_helper.from_array(scale.astype(np.float32) if scale.size > 1 else
                                                      scale.astype(np.float32).reshape(()), scale_name))
    out = names.fresh(f"{bias}_dequantized")
    nodes.append(helper.make_node("DequantizeLinear", [bias, scale_name], [out], name=f"{out}/DequantizeLinear",
                                  **({"axis": 0} if scale.size > 1 else {})))
    return out


def _refuse_unknown(model: onnx.ModelProto) -> None:
    """SnpError naming the first QLinear op, or reader of an integer activation, the rewrite
    would not reproduce exactly."""
    quantized_ops = {"QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearLeakyRelu",
                     "QLinearReduceMean", "QLinearWhere", "QAttention", "QEmbedLayerNormalization", "QLinearConvTranspose"}
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    for node in model.graph.node:
        if node.op_type in quantized_ops:
            raise SnpError(f"{node.op_type} node {node.name}: this QOperator op is not read yet")
        if node.op_type == "QLinearSoftmax" and (_attribute(node, "opset", 1) < 13) != (opset < 13):
            raise SnpError(f"QLinearSoftmax node {node.name}: its axis follows opset {_attribute(node, 'opset', 1)}, "
                           f"the model's Softmax opset {opset}")
        if node.op_type == "QGemm" and (abs(_attribute(node, "alpha", 1.0) - 1.0) > 0 or _attribute(node, "transA", 0)):
            raise SnpError(f"QGemm node {node.name}: alpha ≠ 1 or transA is not read yet")
        if node.op_type in SPECS and output_params(node) is None and node.op_type != "QGemm":
            raise SnpError(f"{node.op_type} node {node.name}: no output scale")
        if node.op_type == "QuantizeLinear" and len(node.input) < 3:
            raise SnpError(f"QuantizeLinear node {node.name}: no zero point (its integer type is implicit)")


def _integer_params(model: onnx.ModelProto, initializers: dict[str, onnx.TensorProto]) -> dict[str, tuple[str, str]]:
    """Each integer activation (or integer table an integer-moving op reads) → its (scale, zero
    point) names: from what makes it and what reads it, carried through the ops that move
    integers. SnpError where a reader of an integer activation is none of the known ones."""
    params: dict[str, tuple[str, str]] = {}
    integer = {t.name for t in model.graph.initializer if t.data_type in _INTEGER_TYPES}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            params[node.output[0]] = (node.input[1], node.input[2])
        elif node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[0] not in initializers:
            params.setdefault(node.input[0], (node.input[1], node.input[2]))
        elif node.op_type in SPECS:
            for first in triples(node):
                if node.input[first] not in initializers:
                    params.setdefault(node.input[first], tuple(node.input[first + 1:first + 3]))
            if output_params(node) is not None:
                params[node.output[0]] = output_params(node)
    moving = [n for n in model.graph.node if n.op_type in MOVING and n.input]
    for _ in range(len(moving) + 1):  # carried both ways until nothing changes
        changed = False
        for node in moving:
            if node.input[0] in initializers and node.input[0] not in integer:
                continue  # a float table
            known = params.get(node.input[0]) or next((params[o] for o in node.output if o in params), None)
            for tensor in (node.input[0], *node.output):
                if known is not None and tensor not in params:
                    params[tensor], changed = known, True
        if not changed:
            break
    quantized = set(params)
    for node in model.graph.node:
        if node.op_type in SPECS or node.op_type in ("DequantizeLinear", "QuantizeLinear", "Shape"):
            continue
        if node.op_type in MOVING and node.input and node.input[0] in quantized:
            if any(t in quantized for t in node.input[1:]):
                raise SnpError(f"{node.op_type} node {node.name}: more than one integer input")
            continue
        reading = [t for t in node.input if t in quantized and t not in initializers]
        if reading:
            raise SnpError(f"{node.op_type} node {node.name} reads the integer tensor {reading[0]}, which the "
                           "QOperator reading does not know how to dequantize")
    return params


class _Names:
    """Fresh tensor names, and the initializers the view adds."""

    def __init__(self, used: set[str]):
        self.used = set(used)
        self.initializers: list[onnx.TensorProto] = []

    def fresh(self, base: str) -> str:
        return fresh_name(self.used, base)


def fresh_name(used: set[str], base: str) -> str:
    """`base`, or `base_N` with the first N not in `used`; the name is added to `used`."""
    name, index = base, 1
    while name in used:
        name, index = f"{base}_{index}", index + 1
    used.add(name)
    return name


def _stem(tensor: str) -> str:
    """The float tensor's name a quantizer's integer tensor was named after."""
    for suffix in ("_quantized", "quantized"):
        if tensor.endswith(suffix):
            return tensor[:-len(suffix)]
    return tensor


def _size(tensor: onnx.TensorProto | None) -> int:
    return 0 if tensor is None else int(np.prod(tensor.dims, dtype=np.int64))


def _attribute(node: onnx.NodeProto, name: str, default):
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy
