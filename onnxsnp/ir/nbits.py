"""Block-quantized weights: com.microsoft.MatMulNBits (int4/int8, as onnxruntime-genai's model
builder and onnxruntime's MatMulNBits quantizer write them).

Pruning works on a float view of the model: every MatMulNBits becomes a MatMul with its weight
dequantized (W[k, n] = (q[n, k] − zero point) · scale of k's block), under the same node name.
After the rewrite, each of those MatMuls becomes a MatMulNBits again: an unchanged weight gets
its original packed tensors back (bit for bit), a sliced or refitted one is quantized again with
the same bits and block size (symmetric, or with zero points where the original had them), and
the error that adds is measured and reported.

A refitted weight (output projection, fc2) is fresh float values: where the refit's Gram of its
inputs is given, it is quantized with error feedback (feedback.py) rather than rounded to the
nearest level.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .feedback import fed_back, inverse_factor
from .graph import attribute

_OP = "MatMulNBits"
log = logging.getLogger("onnxsnp")


@dataclass(frozen=True)
class Packed:
    """One MatMulNBits of the original model."""

    node: onnx.NodeProto
    weight: str  # the dequantized [K, N] weight's name in the float view
    tensors: tuple[onnx.TensorProto, ...]  # its packed initializers (B, scales, zero points)
    bits: int
    block_size: int
    zero_points: bool


@dataclass
class FloatView:
    """The float model pruning works on, and what turns its result back into MatMulNBits."""

    model: onnx.ModelProto
    packed: dict[str, Packed]  # by node name
    errors: dict[str, float] = field(default_factory=dict)  # requantized node → ‖W_q − W‖ / ‖W‖
    feedback: dict[str, float] = field(default_factory=dict)  # with error feedback: node → ‖X·ΔW‖ / ‖X·W‖

    def requantize(self, pruned: onnx.ModelProto, grams: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
        """`pruned` (a rewrite of the float view) with its MatMuls back in MatMulNBits form;
        `grams`: by node name, Σ x xᵀ of a refitted node's (kept) inputs, for error feedback."""
        grams = grams or {}
        model = onnx.ModelProto()
        model.CopyFrom(pruned)
        initializers = {t.name: t for t in model.graph.initializer}
        nodes = list(model.graph.node)
        del model.graph.node[:]
        dropped: set[str] = set()
        self.errors, self.feedback = {}, {}
        for node in nodes:
            record = self.packed.get(node.name)
            if record is None or node.op_type != "MatMul" or node.input[1] not in initializers:
                model.graph.node.append(node)
                continue
            tensor = initializers[node.input[1]]
            if node.input[1] == record.weight:  # untouched: the original bytes
                inputs, tensors = list(record.node.input[1:]), list(record.tensors)
                attributes = {a.name: helper.get_attribute_value(a) for a in record.node.attribute}
            else:
                weight = numpy_helper.to_array(tensor).astype(np.float32)
                gram = grams.get(node.name)
                if gram is not None and gram.shape != (weight.shape[0],) * 2:  # not the refit's inputs: round
                    log.warning("%s: the refit's Gram %s does not fit its weight %s; rounded to nearest",
                                node.name, gram.shape, weight.shape)
                    gram = None
                tensors, attributes, error = _quantized(weight, record, node.name, gram)
                (self.errors if gram is None else self.feedback)[node.name] = error
                inputs = [t.name for t in tensors]
            dropped.add(node.input[1])
            model.graph.node.append(helper.make_node(_OP, [node.input[0]] + inputs, list(node.output), name=node.name,
                                                     domain="com.microsoft", **attributes))
            model.graph.initializer.extend(t for t in tensors if t.name not in initializers)
            initializers.update({t.name: t for t in tensors})
        read = {name for node in model.graph.node for name in node.input}
        kept = [t for t in model.graph.initializer if t.name in read or t.name not in dropped]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        return model


def float_view(model: onnx.ModelProto) -> FloatView | None:
    """The model with every MatMulNBits it can read as a float MatMul; None without any."""
    nodes = [n for n in model.graph.node if n.op_type == _OP and n.domain == "com.microsoft"]
    if not nodes:
        return None
    initializers = {t.name: t for t in model.graph.initializer}
    view = onnx.ModelProto()
    view.CopyFrom(model)
    replaced: dict[str, Packed] = {}
    by_name = {n.name: n for n in view.graph.node}
    for node in nodes:
        inputs = list(node.input) + [""] * (6 - len(node.input))
        if any(inputs[4:]) or any(t and t not in initializers for t in inputs[1:4]):
            continue  # g_idx or a bias input, or run-time weights: left as it is (its block is skipped)
        bits, block = attribute(node, "bits", 4), attribute(node, "block_size", 0)
        if bits not in (4, 8) or not block:
            continue
        tensors = tuple(initializers[t] for t in inputs[1:4] if t)
        if len(tensors) > 2 and tensors[2].data_type != onnx.TensorProto.UINT8:
            continue  # float zero points: left as they are
        weight = dequantize(*(numpy_helper.to_array(t) for t in tensors[:2]),
                            numpy_helper.to_array(tensors[2]) if len(tensors) > 2 else None,
                            attribute(node, "K"), attribute(node, "N"), bits, block)
        name = f"{inputs[1]}__dequantized"
        view.graph.initializer.append(numpy_helper.from_array(weight, name))
        target = by_name[node.name]
        target.op_type, target.domain = "MatMul", ""
        del target.input[1:]
        target.input.append(name)
        del target.attribute[:]
        replaced[node.name] = Packed(node, name, tensors, bits, block, len(tensors) > 2)
    read = {name for node in view.graph.node for name in node.input}
    kept = [t for t in view.graph.initializer if t.name in read]
    del view.graph.initializer[:]
    view.graph.initializer.extend(kept)
    return FloatView(view, replaced) if replaced else None


def dequantize(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int, bits: int,
               block: int) -> np.ndarray:
    """The [K, N] float weight of MatMulNBits' B [N, blocks, block·bits/8], scales, zero points."""
    blocks = -(-k // block)
    values = _unpacked(packed.reshape(n, -1), bits)[:, :blocks * block].reshape(n, blocks, block).astype(np.float32)
    if zero_points is None:
        zero = np.full((n, blocks), 2 ** (bits - 1), np.float32)
    else:
        zero = _unpacked(zero_points.reshape(n, -1), bits)[:, :blocks].astype(np.float32)
    weight = (values - zero[..., None]) * scales.reshape(n, blocks)[..., None].astype(np.float32)
    return np.ascontiguousarray(weight.reshape(n, -1)[:, :k].T)


def _unpacked(data: np.ndarray, bits: int) -> np.ndarray:
    """Rows of bytes → rows of `bits`-bit values, low bits first."""
    if bits == 8:
        return data
    return np.stack([data & 0x0F, data >> 4], axis=-1).reshape(data.shape[0], -1)


def _packed(values: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return values.astype(np.uint8)
    values = values.astype(np.uint8)
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _quantized(weight: np.ndarray, record: Packed, name: str, gram: np.ndarray | None = None
               ) -> tuple[list[onnx.TensorProto], dict, float]:
    """[K, N] float → MatMulNBits' packed tensors and attributes with the record's bits and block
    size, rounded to the nearest level or, with `gram` (Σ x xᵀ of the K inputs), with error
    feedback; and the relative error quantizing adds (of the weight, or with `gram` of X·W)."""
    k, n = weight.shape
    bits, block = record.bits, record.block_size
    blocks = -(-k // block)
    if gram is None:
        values, scale, zero = _rounded(weight, bits, block, record.zero_points)
    else:
        values, scale, zero = _error_feedback(weight, gram, bits, block, record.zero_points)
    restored = ((values - zero[..., None]) * scale[..., None]).reshape(n, -1)[:, :k].T
    if gram is None:
        error = float(np.linalg.norm(restored - weight) / max(np.linalg.norm(weight), 1e-30))
    else:
        delta, w = (restored - weight).astype(np.float64), weight.astype(np.float64)
        energy = float(np.einsum("ij,ik,kj->", w, gram, w))
        error = float(np.sqrt(max(np.einsum("ij,ik,kj->", delta, gram, delta), 0.0) / max(energy, 1e-30)))
    base = f"{name}/requantized"
    tensors = [numpy_helper.from_array(_packed(values, bits).reshape(n, blocks, -1), f"{base}/B"),
               numpy_helper.from_array(_like(scale.astype(_dtype(record.tensors[1])), record.tensors[1]),
                                       f"{base}/scales")]
    if record.zero_points:  # packed per row, padded to whole bytes
        tensors.append(numpy_helper.from_array(_like(_packed(zero, bits), record.tensors[2]), f"{base}/zero_points"))
    attributes = {a.name: helper.get_attribute_value(a) for a in record.node.attribute}
    attributes.update(K=k, N=n)
    return tensors, attributes, error


def _levels(grouped: np.ndarray, bits: int, zero_points: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each block of `grouped` (..., block values)."""
    top = 2 ** bits - 1
    if zero_points:  # asymmetric: each block's range onto 0 … 2^bits − 1
        low, high = np.minimum(grouped.min(-1), 0), np.maximum(grouped.max(-1), 0)
        scale = np.where(high > low, (high - low) / top, 1.0).astype(np.float32)
        return scale, np.clip(np.round(-low / scale), 0, top)
    # symmetric around 2^(bits−1), as onnxruntime's kernels quantize without zero points: the value
    # of largest magnitude maps to −2^(bits−1) (so weights already on such a grid come back exactly)
    middle = 2 ** (bits - 1)
    extreme = np.take_along_axis(grouped, np.abs(grouped).argmax(-1)[..., None], -1)[..., 0]
    scale = (extreme / -middle).astype(np.float32)
    return np.where(scale == 0, np.float32(1.0), scale), np.full(scale.shape, float(middle))


def _rounded(weight: np.ndarray, bits: int, block: int, zero_points: bool
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round to nearest: levels (N, blocks, block), scales and zero points (N, blocks)."""
    k, n = weight.shape
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), np.float32)
    padded[:, :k] = weight.T
    grouped = padded.reshape(n, blocks, block)
    scale, zero = _levels(grouped, bits, zero_points)
    values = np.clip(np.round(grouped / scale[..., None]) + zero[..., None], 0, 2 ** bits - 1)
    return values, scale, zero


def _error_feedback(weight: np.ndarray, gram: np.ndarray, bits: int, block: int, zero_points: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ over the input rows in order (feedback.py), a block's scale and zero point taken from
    its rows as the earlier rows' errors left them; the same outputs as `_rounded`."""
    k, n = weight.shape
    blocks = -(-k // block)
    top = 2 ** bits - 1
    factor = inverse_factor(gram)
    if factor is None:
        return _rounded(weight, bits, block, zero_points)
    values = np.zeros((n, blocks, block))
    scale = np.ones((n, blocks), np.float32)
    zero = np.zeros((n, blocks))

    def starting(start: int, end: int, rows: np.ndarray) -> None:
        scale[:, start // block], zero[:, start // block] = (
            part[:, 0] for part in _levels(rows.T[:, None, :].astype(np.float32), bits, zero_points))

    def rounded(row: int, value: np.ndarray) -> np.ndarray:
        s, z = scale[:, row // block].astype(np.float64), zero[:, row // block]
        q = np.clip(np.round(value / s) + z, 0, top)
        values[:, row // block, row % block] = q
        return (q - z) * s

    fed_back(weight, factor, rounded, block, starting)
    if k < blocks * block:  # the last block's padding: the level of zero
        values[:, -1, k - (blocks - 1) * block:] = zero[:, -1:]
    return values, scale, zero


def _like(values: np.ndarray, original: onnx.TensorProto) -> np.ndarray:
    """(N, per row) values in the original's layout: flat, or one row per output."""
    return values.reshape(-1) if len(original.dims) == 1 else values.reshape(values.shape[0], -1)


def _dtype(tensor: onnx.TensorProto) -> np.dtype:
    return helper.tensor_dtype_to_np_dtype(tensor.data_type)
