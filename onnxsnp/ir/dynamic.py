"""Dynamically quantized linear layers, as onnxruntime's quantize_dynamic writes them:

    x_q, x_scale, x_zero = DynamicQuantizeLinear(x)
    y = Cast(MatMulInteger(x_q, W_q, x_zero, w_zero), float) · Mul(x_scale, w_scale)

which is x·W with W = (W_q − w_zero)·w_scale, up to the rounding of x. w_scale and w_zero are per
tensor or per output channel (quantize_dynamic's per_channel).

Pruning works on a view of the model where each such layer is a MatMul reading its weight through
DequantizeLinear(W_q, w_scale, w_zero) — the weight-only int8 form the matcher and the editor
already know (quantized.py slices the integer tensor with a per-channel scale and zero point, and
quantizes refitted weights again with the same scheme). After the rewrite each of those MatMuls
is turned back into the dynamic form from the (maybe sliced or requantized) integer tensors, so
the written file stays dynamically quantized; an untouched layer gets its original tensors back.
The view computes with float activations; the written model rounds them again at run time.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

_DEQUANTIZED = "__snp_dequantized"  # suffix of the view's weight tensors


@dataclass(frozen=True)
class _Layer:
    """One dynamically quantized product: the nodes it replaces and where its parts are."""

    quantize: onnx.NodeProto  # DynamicQuantizeLinear(x)
    integer: onnx.NodeProto  # MatMulInteger
    nodes: tuple[str, ...]  # MatMulInteger, Cast, the scales' Mul and the output Mul (names)
    weight: str  # W_q
    scale: str  # w_scale
    zero: str | None  # w_zero


@dataclass
class DynamicView:
    """The model pruning works on, and what turns its MatMuls back into the dynamic form."""

    model: onnx.ModelProto
    layers: dict[str, _Layer]  # by the view's MatMul name (the MatMulInteger's)
    outputs: dict[str, str]  # the float output of each (the output scale Mul's)

    def view_shapes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Run-time shapes of the view's MatMul inputs and outputs from those of the quantized
        model's MatMulIntegers (the quantized input and the integer product have the float
        input's and output's shapes), so the view's MACs are counted from a run of the model."""
        dims = {t.name: tuple(t.dims) for t in self.model.graph.initializer}
        found = {}
        for name, layer in self.layers.items():
            x_q, product = layer.integer.input[0], layer.integer.output[0]
            if x_q in shapes and product in shapes:
                found[layer.quantize.input[0]] = shapes[x_q]
                found[self.outputs[name]] = shapes[product]
                found[f"{layer.weight}{_DEQUANTIZED}"] = dims[layer.weight]
        return found

    def requantize(self, pruned: onnx.ModelProto) -> onnx.ModelProto:
        """`pruned` (a rewrite of the view) with each recorded MatMul in the dynamic form again.
        Its weight must still be DequantizeLinear of integer constants (the editor keeps it so);
        one DynamicQuantizeLinear is made per activation tensor and shared, as the quantizer does."""
        model = onnx.ModelProto()
        model.CopyFrom(pruned)
        graph = model.graph
        initializers = {t.name: t for t in graph.initializer}
        producers = {o: n for n in graph.node for o in n.output}
        # activation → [x_q, x_scale, x_zero]: those of a DynamicQuantizeLinear still there (read by
        # a layer outside the view's records) are shared rather than made twice under one name
        quantized = {n.input[0]: list(n.output) for n in graph.node if n.op_type == "DynamicQuantizeLinear"}
        nodes, replaced = [], set()
        for node in graph.node:
            layer = self.layers.get(node.name)
            dequantize = producers.get(node.input[1]) if layer is not None and node.op_type == "MatMul" else None
            if dequantize is None or dequantize.op_type != "DequantizeLinear" or \
                    any(t not in initializers for t in dequantize.input if t):
                nodes.append(node)
                continue
            replaced.add(dequantize.name)
            x = node.input[0]
            if x not in quantized:
                quantized[x] = [f"{x}_quantized", f"{x}_scale", f"{x}_zero_point"]
                original = layer.quantize
                nodes.append(helper.make_node("DynamicQuantizeLinear", [x], quantized[x],
                                              name=original.name if x == original.input[0] else f"{x}_QuantizeLinear"))
            x_q, x_scale, x_zero = quantized[x]
            weight, scale = dequantize.input[0], dequantize.input[1]
            zero = dequantize.input[2] if len(dequantize.input) > 2 else ""
            base = node.name
            nodes += [
                helper.make_node("Mul", [x_scale, scale], [f"{base}/scales"], name=f"{base}/scales_mul"),
                helper.make_node("MatMulInteger", [x_q, weight, x_zero] + ([zero] if zero else []), [f"{base}/integer"],
                                 name=base),
                helper.make_node("Cast", [f"{base}/integer"], [f"{base}/cast"], name=f"{base}/cast",
                                 to=onnx.TensorProto.FLOAT),
                helper.make_node("Mul", [f"{base}/cast", f"{base}/scales"], list(node.output), name=f"{base}/output_scale"),
            ]
        kept = [n for n in nodes if n.name not in replaced]
        del graph.node[:]
        graph.node.extend(_in_order(kept))
        read = {t for n in graph.node for t in n.input}
        alive = [t for t in graph.initializer if t.name in read]
        del graph.initializer[:]
        graph.initializer.extend(alive)
        return model


def dynamic_view(model: onnx.ModelProto) -> DynamicView | None:
    """The model with every dynamically quantized product it can read as DequantizeLinear → MatMul;
    None without any."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    found: dict[str, tuple[_Layer, str, onnx.NodeProto]] = {}  # MatMulInteger name → (layer, output, view MatMul)
    for node in graph.node:
        match = _match(node, initializers, producers, consumers)
        if match is not None:
            found[node.name] = match
    if not found:
        return None
    view = onnx.ModelProto()
    view.CopyFrom(model)
    dropped = {name for layer, _, _ in found.values() for name in layer.nodes}
    nodes = []
    for node in view.graph.node:
        if node.name in found:
            layer, output, _ = found[node.name]
            weight = f"{layer.weight}{_DEQUANTIZED}"
            x = layer.quantize.input[0]
            axis = 1  # the output channels of a [K, N] weight (a per-tensor scale ignores it)
            nodes.append(helper.make_node("DequantizeLinear", [layer.weight, layer.scale] + ([layer.zero] if layer.zero else []),
                                          [weight], name=f"{node.name}/dequantize", axis=axis))
            nodes.append(helper.make_node("MatMul", [x, weight], [output], name=node.name))
        elif node.name not in dropped:
            nodes.append(node)
    read = {t for n in nodes for t in n.input}
    # a DynamicQuantizeLinear that only the replaced layers read goes
    nodes = [n for n in nodes if n.op_type != "DynamicQuantizeLinear" or any(o in read for o in n.output)]
    del view.graph.node[:]
    view.graph.node.extend(nodes)
    return DynamicView(view, {name: layer for name, (layer, _, _) in found.items()},
                       {name: output for name, (_, output, _) in found.items()})


def _match(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto],
           consumers: dict[str, list[onnx.NodeProto]]) -> tuple[_Layer, str, None] | None:
    """(layer, its float output) where `node` is a MatMulInteger of the quantize_dynamic form."""
    if node.op_type != "MatMulInteger" or node.domain not in ("", "ai.onnx") or len(node.input) < 3:
        return None
    quantize = producers.get(node.input[0])
    if quantize is None or quantize.op_type != "DynamicQuantizeLinear" or \
            list(quantize.output[::2]) != [node.input[0], node.input[2]]:
        return None
    weight, zero = node.input[1], node.input[3] if len(node.input) > 3 and node.input[3] else None
    if weight not in initializers or zero is not None and zero not in initializers:
        return None
    values = numpy_helper.to_array(initializers[weight])
    if values.ndim != 2 or values.dtype not in (np.int8, np.uint8):
        return None
    n = values.shape[1]
    if zero is not None and numpy_helper.to_array(initializers[zero]).size not in (1, n):
        return None
    cast = _single(consumers, node.output[0])
    if cast is None or cast.op_type != "Cast" or helper.get_attribute_value(cast.attribute[0]) != onnx.TensorProto.FLOAT:
        return None
    output_mul = _single(consumers, cast.output[0])
    if output_mul is None or output_mul.op_type != "Mul":
        return None
    scales = producers.get(next((t for t in output_mul.input if t != cast.output[0]), ""))
    if scales is None or scales.op_type != "Mul" or quantize.output[1] not in scales.input or \
            len(consumers.get(scales.output[0], [])) != 1:
        return None
    scale = next((t for t in scales.input if t != quantize.output[1]), None)
    if scale not in initializers or numpy_helper.to_array(initializers[scale]).size not in (1, n):
        return None
    scale_values = numpy_helper.to_array(initializers[scale])
    if scale_values.size == 1 and scale_values.ndim:  # DequantizeLinear takes a per-tensor scale as a scalar
        return None
    layer = _Layer(quantize, node, (node.name, cast.name, scales.name, output_mul.name), weight, scale, zero)
    return layer, output_mul.output[0], None


def _single(consumers: dict[str, list[onnx.NodeProto]], tensor: str) -> onnx.NodeProto | None:
    readers = consumers.get(tensor, [])
    return readers[0] if len(readers) == 1 else None


def _in_order(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """`nodes` topologically sorted (a DynamicQuantizeLinear made at its first reader's place may
    follow another reader that came first), stable otherwise."""
    produced = {o for n in nodes for o in n.output}
    ready, order = set(), []
    pending = list(nodes)
    while pending:
        rest = []
        for node in pending:
            if all(not t or t not in produced or t in ready for t in node.input):
                order.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            return order + rest  # a cycle cannot come from the rewrite; leave it for the checker
        pending = rest
    return order
