"""The pruned static QDQ view of a QOperator model turned back into QOperator form (qoperator.py).

Each float op that stood for a QLinear op reads its integer inputs through DequantizeLinear and
writes through one QuantizeLinear, as the view made it — the scales and zero points maybe
calibrated again, the integer weights maybe sliced or quantized again. The QLinear op is made from
those tensors, with the original's attributes; an int32 bias (QLinearConv, QGemm) is quantized
again in units of the current a_scale·b_scale, since recalibrating a_scale moves that unit. An op
that moves integers goes back to reading and writing integers where its QuantizeLinear has its
DequantizeLinear's parameters (recalibration keeps them one range). DequantizeLinear and
QuantizeLinear nodes nothing reads any more go. A rewritten op that no longer has that shape is
refused naming it: the written model is in QOperator form or not written.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .dynamic import _in_order
from ..errors import SnpError
from .qoperator import MOVING, SPECS, QOperatorView, Rewritten, fresh_name, triples


def fused(view: QOperatorView, pruned: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(pruned)
    graph = model.graph
    constants = _Constants(graph)
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)
    outputs = {o.name for o in graph.output}
    # a node's outputs → what stands for it (None: dropped); nodes are unhashable messages, and the
    # outputs name one node (every tensor has one producer)
    replaced: dict[tuple[str, ...], onnx.NodeProto | None] = {}
    added: list[onnx.NodeProto] = []  # QuantizeLinear ops a QLinear op made again reads
    for node in graph.node:
        rewritten = view.rewritten.get(node.name)
        if rewritten is not None and node.op_type == SPECS[rewritten.original.op_type].float_op:
            made = _qlinear(node, rewritten, producers, readers, outputs, constants, added)
            if made is None:
                raise SnpError(f"{rewritten.original.op_type} node {node.name}: after pruning it is no longer "
                               "DequantizeLinear → op → QuantizeLinear, so it cannot be written in QOperator form")
            replaced[tuple(node.output)] = made
            quantize = _only_quantize(node.output[0], readers, outputs)
            if quantize is not None:
                replaced[tuple(quantize.output)] = None
    nodes = list(added)
    for node in graph.node:
        stand_in = replaced.get(tuple(node.output), node)
        if stand_in is not None:
            nodes.append(stand_in)
    for node in nodes:  # a shape read from the float tensor is the integer tensor's shape
        dequantize = producers.get(node.input[0]) if node.op_type == "Shape" else None
        if dequantize is not None and dequantize.op_type == "DequantizeLinear":
            node.input[0] = dequantize.input[0]
    nodes = _unread_dropped(_integers_moved(_in_order(nodes), outputs, constants), outputs)
    del graph.node[:]
    graph.node.extend(_in_order(nodes))
    read = {t for n in graph.node for t in n.input} | outputs
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept + [t for t in constants.added if t.name in read])
    return model


def _qlinear(node: onnx.NodeProto, rewritten: Rewritten, producers, readers, outputs,
             constants: "_Constants", added: list[onnx.NodeProto]) -> onnx.NodeProto | None:
    """The QLinear op standing for float `node` again (QuantizeLinear ops it needs go to `added`);
    None where it is no longer in that shape."""
    original = rewritten.original
    spec = SPECS[original.op_type]
    firsts = triples(original)
    if len(node.input) < len(firsts):
        return None
    inputs = list(original.input)
    for position, first in enumerate(firsts):
        dequantize = producers.get(node.input[position])
        if dequantize is not None and dequantize.op_type == "DequantizeLinear":
            inputs[first:first + 3] = [*dequantize.input[:2], dequantize.input[2] if len(dequantize.input) > 2 else ""]
            continue
        # a constant pruning recomputed (the attention's scale after rescaling Q and K) is written
        # as the float it stands for: quantized again in the original's integer type
        value = constants.value(node.input[position], producers)
        if value is None:
            # a run-time tensor the rewrite selected from one the op read (a rotary table's
            # dims gathered per head): quantized with the original input's scale and zero point,
            # which gives the integers the original selected from
            scale, zero = original.input[first + 1], original.input[first + 2]
            if scale not in constants.initializers or zero and zero not in constants.initializers or \
                    (scale, zero) not in _selected_from(node.input[position], producers):
                return None
            integer = fresh_name(constants.used, f"{node.input[position]}_quantized")
            added.append(helper.make_node("QuantizeLinear", [node.input[position], scale] + ([zero] if zero else []),
                                          [integer], name=fresh_name(constants.used, f"{integer}/QuantizeLinear")))
            inputs[first:first + 3] = [integer, scale, zero]
            continue
        inputs[first:first + 3] = constants.quantized(f"{original.input[first]}_requantized", value,
                                                      np.dtype(rewritten.zero_types[position]))
    if spec.output is not None:
        quantize = _only_quantize(node.output[0], readers, outputs)
        if quantize is None:
            return None
        inputs[spec.output:spec.output + 2] = [quantize.input[1], quantize.input[2] if len(quantize.input) > 2 else ""]
        out = quantize.output[0]
    else:
        out = node.output[0]
    if spec.bias is not None and len(node.input) > len(firsts) and node.input[len(firsts)]:
        bias = _bias(node.input[len(firsts)], inputs[1], inputs[4], producers, constants, f"{original.name}/bias")
        if bias is None:
            return None
        inputs[spec.bias] = bias
    made = helper.make_node(original.op_type, inputs, [out], name=original.name, domain=original.domain)
    made.attribute.extend(original.attribute)
    return made


def _selected_from(tensor: str, producers) -> set[tuple[str, str]]:
    """The (scale, zero point) names of the DequantizeLinear ops whose values `tensor` only
    selects or moves (through MOVING ops and Concat); empty where anything computes on the way."""
    found, pending, seen = set(), [tensor], set()
    while pending:
        current = pending.pop()
        node = producers.get(current)
        if current in seen:
            continue
        seen.add(current)
        if node is None:
            return set()
        if node.op_type == "DequantizeLinear":
            found.add((node.input[1], node.input[2] if len(node.input) > 2 else ""))
        elif node.op_type in MOVING or node.op_type == "Concat":
            data = node.input if node.op_type == "Concat" else node.input[:1]  # the others: indices, shapes
            pending.extend(t for t in data if t)
        else:
            return set()
    return found


def _bias(tensor: str, a_scale: str, b_scale: str, producers, constants: "_Constants", name: str) -> str | None:
    """An int32 bias in units of a_scale·b_scale for the float bias `tensor`."""
    value = constants.value(tensor, producers)
    scales = [constants.value(t, producers) for t in (a_scale, b_scale)]
    if value is None or any(s is None for s in scales):
        return None
    unit = (scales[0] * scales[1]).reshape(-1).astype(np.float64)
    return constants.add(name, np.round(value.astype(np.float64) / unit).astype(np.int32))


def _only_quantize(tensor: str, readers, outputs) -> onnx.NodeProto | None:
    found = readers.get(tensor, [])
    if tensor in outputs or len(found) != 1 or found[0].op_type != "QuantizeLinear":
        return None
    return found[0]


def _integers_moved(nodes: list[onnx.NodeProto], outputs: set[str], constants: "_Constants") -> list[onnx.NodeProto]:
    """`nodes` with every op that only moves values (qoperator.MOVING) reading integers again:
    DequantizeLinear(x) → op becomes op(x) → DequantizeLinear with the same per-tensor scale and
    zero point (exact: the op selects or moves values), until a QuantizeLinear with those same
    parameters meets it and both go (QuantizeLinear(DequantizeLinear(x)) is x). Chains the
    rewrite made (the per-head selections of a fused QKV) move integers as the quantizer's ops did;
    a QuantizeLinear with other parameters (a range calibrated again) stays a requantization."""
    while True:
        producers = {o: n for n in nodes for o in n.output}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for node in nodes:
            for t in node.input:
                readers.setdefault(t, []).append(node)
        changed = False
        for index, node in enumerate(nodes):
            dequantize = producers.get(node.input[0]) if node.input else None
            if dequantize is None or dequantize.op_type != "DequantizeLinear" or not _per_tensor(dequantize, producers, constants):
                continue
            if node.op_type == "QuantizeLinear" and node.output[0] not in outputs and \
                    _same_parameters(dequantize, node, producers, constants):
                rename = {node.output[0]: dequantize.input[0]}
                for reader in readers.get(node.output[0], []):
                    reader.input[:] = [rename.get(t, t) for t in reader.input]
                del nodes[index]
                changed = True
                break
            if node.op_type in MOVING and not any(o in outputs for o in node.output):
                moved, after = onnx.NodeProto(), []
                moved.CopyFrom(node)
                moved.input[0] = dequantize.input[0]
                for position, output in enumerate(node.output):
                    moved.output[position] = constants.fresh(f"{output}_quantized")
                    after.append(helper.make_node("DequantizeLinear", [moved.output[position], *dequantize.input[1:]],
                                                  [output], name=constants.fresh(f"{output}/DequantizeLinear")))
                nodes[index:index + 1] = [moved, *after]
                changed = True
                break
        if not changed:
            return nodes


def _per_tensor(dequantize: onnx.NodeProto, producers, constants: "_Constants") -> bool:
    scale = constants.value(dequantize.input[1], producers)
    return scale is not None and scale.size == 1


def _same_parameters(dequantize: onnx.NodeProto, quantize: onnx.NodeProto, producers, constants: "_Constants") -> bool:
    if len(dequantize.input) != len(quantize.input):
        return False
    for a, b in zip(dequantize.input[1:], quantize.input[1:]):
        x, y = constants.value(a, producers), constants.value(b, producers)
        if x is None or y is None or x.dtype != y.dtype or x.size != y.size or np.any(x.reshape(-1) != y.reshape(-1)):
            return False
    return True


def _unread_dropped(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """Without the DequantizeLinear and QuantizeLinear nodes nothing reads (the fused ops read
    the integers themselves)."""
    while True:
        read = {t for n in nodes for t in n.input} | outputs
        kept = [n for n in nodes if n.op_type not in ("DequantizeLinear", "QuantizeLinear") or
                any(o in read for o in n.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


class _Constants:
    """Constant values (an initializer, or DequantizeLinear of one) and the initializers added."""

    def __init__(self, graph: onnx.GraphProto):
        self.initializers = {t.name: t for t in graph.initializer}
        self.added: list[onnx.TensorProto] = []
        self.used = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | \
            {n.name for n in graph.node}

    def value(self, tensor: str, producers) -> np.ndarray | None:
        if tensor in self.initializers:
            return numpy_helper.to_array(self.initializers[tensor])
        node = producers.get(tensor)
        if node is not None and node.op_type == "Constant":
            found = next((a for a in node.attribute if a.name == "value"), None)
            return None if found is None else numpy_helper.to_array(found.t)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        parts = [self.value(t, producers) if t else None for t in node.input]
        if parts[0] is None or parts[1] is None:
            return None
        zero = parts[2] if len(parts) > 2 and parts[2] is not None else np.zeros_like(parts[1])
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * parts[0].ndim
        if parts[1].size > 1:
            shape[axis % parts[0].ndim] = -1
        return ((parts[0].astype(np.float64) - zero.reshape(shape)) * parts[1].reshape(shape)).astype(np.float32)

    def quantized(self, base: str, value: np.ndarray, dtype: np.dtype) -> list[str]:
        """(integers, scale, zero point) names of `value` quantized per tensor in `dtype`, its
        range (zero included) mapped onto the type's: a scalar comes back exactly."""
        info = np.iinfo(dtype)
        low, high = min(float(value.min()), 0.0), max(float(value.max()), 0.0)
        scale = (high - low) / (info.max - info.min) if high > low else 1.0
        zero = int(np.clip(np.round(info.min - low / scale), info.min, info.max))
        integers = np.clip(np.round(value / scale) + zero, info.min, info.max).astype(dtype)
        return [self.add(base, integers), self.add(f"{base}_scale", np.asarray(scale, np.float32)),
                self.add(f"{base}_zero_point", np.asarray(zero, dtype))]

    def fresh(self, base: str) -> str:
        return fresh_name(self.used, base)

    def add(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        tensor = numpy_helper.from_array(value, name)
        self.added.append(tensor)
        self.initializers[name] = tensor
        return name
