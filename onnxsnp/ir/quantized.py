"""Weights stored quantized: an integer tensor turned into the float weight on its way to the
layer by DequantizeLinear, or by Cast → (Sub zero point) → Mul scale.

Cutting such a weight slices the integer tensor — and a per-channel scale and zero point that
run along the cut axis — so the written file stays quantized. New values (refitted weights,
rescaled q columns) are quantized again with the same scheme: the same integer type, per
tensor or per channel along the same axis, with a zero point only where the original had a
non-zero one; a refitted weight whose inputs' Gram is known is rounded with error feedback
(feedback.py) on that scheme. The original chain is never edited: a copy feeds the pruned
layer, so a weight other layers share keeps its value.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from .feedback import fed_back, inverse_factor

_CHAIN_OPS = {"DequantizeLinear", "Cast", "Mul", "Sub", "Identity"}


@dataclass
class Chain:
    source: gs.Tensor  # the integer tensor (a constant, maybe behind Identity or a Constant node)
    nodes: list[gs.Node]  # from it to the float weight, in order
    data: list[int]  # which input of each node carries the weight


def _constant(tensor: gs.Tensor) -> gs.Constant | None:
    """The constant a gs tensor is: an initializer, a Constant node's, or either behind Identity."""
    while isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op in ("Identity", "Constant"):
        node = tensor.inputs[0]
        if node.op == "Constant":
            value = node.attrs.get("value")
            return value if isinstance(value, gs.Constant) else None
        tensor = node.inputs[0]
    return tensor if isinstance(tensor, gs.Constant) else None


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant gs tensor, decoded for the caller and not kept by the constant
    (rewrite/lazy.py: graphsurgeon's `values` would keep every integer weight the rewrite reads
    in memory beside its slice until the end)."""
    constant = _constant(tensor)
    if constant is None:
        return None
    values = constant._values  # as rewrite/lazy.py `read` (whose FromFile is a LazyValues too)
    return values.load() if isinstance(values, LazyValues) and type(values).__name__ != "SparseValues" \
        else constant.values


def _is_integer(tensor: gs.Tensor) -> bool:
    constant = _constant(tensor)  # its type and rank, without decoding it
    return constant is not None and np.issubdtype(constant.dtype, np.integer) and len(constant.shape) >= 1


def chain_signature(chain: Chain) -> tuple[tuple[int, ...], np.dtype] | None:
    """The shape and dtype of the float weight `chain` computes, without computing it; None where
    a node is not one whose output type is known from its constant inputs."""
    source = _constant(chain.source)
    shape, dtype = tuple(source.shape), source.dtype
    for node, data in zip(chain.nodes, chain.data):
        if node.op == "DequantizeLinear":  # the output takes the scale's type (the data's shape)
            scale = _constant(node.inputs[1])
            if scale is None or "output_dtype" in node.attrs:
                return None
            dtype = scale.dtype
        elif node.op == "Cast":
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
        elif node.op in ("Mul", "Sub"):
            other = _constant(node.inputs[1 - data])
            if other is None:
                return None
            shape, dtype = np.broadcast_shapes(shape, tuple(other.shape)), other.dtype
    return (shape, dtype) if isinstance(dtype, np.dtype) else None  # an ONNX-only type: read from the value


def chain_behind(tensor: gs.Tensor) -> Chain | None:
    """The dequantizing chain that computes `tensor` from an integer constant, if it is one."""
    nodes, data = [], []
    while not _is_integer(tensor):
        if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1 or tensor.inputs[0].op not in _CHAIN_OPS:
            return None
        node = tensor.inputs[0]
        index = 0 if node.op in ("DequantizeLinear", "Cast", "Identity") else \
            next((i for i, x in enumerate(node.inputs) if _constant(x) is None or _is_integer(x)), None)
        if index is None or len(node.outputs) != 1:
            return None
        nodes.append(node)
        data.append(index)
        tensor = node.inputs[index]
    if not nodes or not any(n.op in ("DequantizeLinear", "Cast") for n in nodes):
        return None
    return Chain(tensor, nodes[::-1], data[::-1])


def _aligned_axis(node: gs.Node, index: int, value: np.ndarray, rank: int) -> int | None:
    """The weight axis that parameter `value` (input `index` of `node`) varies along: None for a
    per-tensor parameter, -1 for one that varies along several."""
    if value.size <= 1:
        return None
    if node.op == "DequantizeLinear":
        return int(node.attrs.get("axis", 1)) % rank
    varying = [rank - value.ndim + i for i, size in enumerate(value.shape) if size > 1]
    return varying[0] if len(varying) == 1 else -1  # -1: varies along several axes


def _copy(editor, node: gs.Node, inputs: list[gs.Tensor]) -> gs.Variable:
    out = editor.variable(node.outputs[0].name, node.outputs[0].dtype)
    editor.add_node(node.op, inputs, [out], dict(node.attrs))
    return out


def sliced(chain: Chain, axis: int, keep: np.ndarray, editor) -> gs.Tensor:
    """A copy of `chain` (nodes and constants added through `editor`) computing the weight with
    only indices `keep` along `axis`."""
    source = constant_value(chain.source)
    rank = source.ndim
    axis %= rank
    current: gs.Tensor = editor.constant(chain.source.name, np.take(source, keep, axis))
    for node, data in zip(chain.nodes, chain.data):
        inputs = []
        for index, tensor in enumerate(node.inputs):
            value = None if index == data else constant_value(tensor)
            if index == data:
                inputs.append(current)
            elif value is not None and _aligned_axis(node, index, value, rank) == axis:
                along = 0 if node.op == "DequantizeLinear" else axis - (rank - value.ndim)
                inputs.append(editor.constant(tensor.name, np.take(value, keep, along)))
            else:
                inputs.append(tensor)
        current = _copy(editor, node, inputs)
    return current


@dataclass
class _Scheme:
    scale: tuple[int, int]  # (node index, input index) of the scale
    zero: tuple[int, int] | None  # and of the zero point, if any
    axis: int | None  # the weight axis a per-channel scale runs along


def _scheme(chain: Chain, rank: int) -> _Scheme | None:
    """Where the scale and zero point are: DequantizeLinear(q, s, z), or Cast → [Sub z] → Mul s."""
    ops = [n.op for n in chain.nodes if n.op != "Identity"]
    positions = {n.op: i for i, n in enumerate(chain.nodes)}
    if ops == ["DequantizeLinear"]:
        node = chain.nodes[positions["DequantizeLinear"]]
        scale, zero = (positions["DequantizeLinear"], 1), (positions["DequantizeLinear"], 2) if len(node.inputs) > 2 else None
    elif ops in (["Cast", "Mul"], ["Cast", "Sub", "Mul"]):
        at = positions["Mul"]
        scale = (at, 1 - chain.data[at])
        zero = (positions["Sub"], 1) if "Sub" in positions and chain.data[positions["Sub"]] == 0 else None
        if "Sub" in positions and zero is None:
            return None
    else:
        return None
    node, index = chain.nodes[scale[0]], scale[1]
    axis = _aligned_axis(node, index, constant_value(node.inputs[index]), rank)
    return None if axis == -1 else _Scheme(scale, zero, axis)


def requantized(chain: Chain, values: np.ndarray, editor, gram: np.ndarray | None = None, rows: int = 0
                ) -> tuple[gs.Tensor, np.ndarray, np.ndarray, np.ndarray] | None:
    """A copy of `chain` computing `values` quantized with the chain's scheme, with what it
    computes: the integer levels written, the zero point and the scale in float64 (the values:
    ((levels − zero) · scale) in `values`' dtype, rewrite/known.py); None where the scheme is not
    one of the two known ones. `gram`: Σ x xᵀ of the inputs that axis `rows` of `values` reads (a
    refit's), for rounding with error feedback."""
    source = constant_value(chain.source)
    scheme = _scheme(chain, values.ndim)
    if scheme is None or source.ndim != values.ndim:
        return None
    low_q, high_q = _integer_range(source)
    scale_node, scale_index = chain.nodes[scheme.scale[0]], scheme.scale[1]
    scale_old = constant_value(scale_node.inputs[scale_index])
    zero_old = None if scheme.zero is None else constant_value(chain.nodes[scheme.zero[0]].inputs[scheme.zero[1]])
    others = tuple(a for a in range(values.ndim) if a != scheme.axis)
    low = np.minimum(values.min(axis=others, keepdims=True), 0).astype(np.float64)
    high = np.maximum(values.max(axis=others, keepdims=True), 0).astype(np.float64)
    if zero_old is not None and np.any(zero_old != 0):  # asymmetric: the range maps onto [qmin, qmax]
        scale = np.where(high > low, (high - low) / (high_q - low_q), 1.0)
        zero = np.clip(np.round(low_q - low / scale), low_q, high_q)
    else:  # symmetric around zero
        scale = np.maximum(np.maximum(-low, high) / high_q, np.finfo(np.float32).tiny)
        zero = np.zeros_like(scale)
    factor = inverse_factor(gram) if gram is not None and gram.shape == (values.shape[rows],) * 2 else None
    if factor is None:
        quantized = np.clip(np.round(values / scale) + zero, low_q, high_q)
    else:
        quantized = _fed_back(values, factor, rows, scale, zero, (low_q, high_q))
    levels = quantized.astype(source.dtype)  # whole numbers within the type's range: exact
    replace = {scheme.scale: scale.reshape(scale_old.shape).astype(scale_old.dtype)}
    if scheme.zero is not None:
        replace[scheme.zero] = zero.reshape(zero_old.shape).astype(zero_old.dtype)
    current: gs.Tensor = editor.constant(chain.source.name, levels)
    for position, (node, data) in enumerate(zip(chain.nodes, chain.data)):
        inputs = [current if index == data else
                  editor.constant(tensor.name, replace[(position, index)]) if (position, index) in replace
                  else tensor for index, tensor in enumerate(node.inputs)]
        current = _copy(editor, node, inputs)
    return current, levels, zero, scale


def _fed_back(values: np.ndarray, factor: np.ndarray, rows: int, scale: np.ndarray, zero: np.ndarray,
              bounds: tuple[int, int]) -> np.ndarray:
    """The levels of `values` rounded with error feedback along axis `rows` (feedback.py), with
    the scale and zero point the range gave: the scheme stays that of nearest rounding."""
    levels = np.zeros(np.moveaxis(values, rows, 0).shape)
    row_scale = np.moveaxis(np.broadcast_to(scale, values.shape), rows, 0)
    row_zero = np.moveaxis(np.broadcast_to(zero, values.shape), rows, 0)

    def rounded(row: int, value: np.ndarray) -> np.ndarray:
        levels[row] = np.clip(np.round(value / row_scale[row]) + row_zero[row], *bounds)
        return (levels[row] - row_zero[row]) * row_scale[row]

    fed_back(np.moveaxis(values, rows, 0), factor, rounded)
    return np.moveaxis(levels, 0, rows)


def _integer_range(source: np.ndarray) -> tuple[int, int]:
    """The integer range the original weights use: the type's, or its lower 7 bits where every
    value fits them — onnxruntime's reduce_range, which keeps u8·s8 pair sums from saturating in
    the AVX2 kernels, so values quantized again must stay in it too."""
    info = np.iinfo(source.dtype)
    if source.size >= 64:  # too few values say nothing about the range they were drawn from
        low, high = (-64, 64) if info.min < 0 else (0, 127)  # onnxruntime's reduced int8 range is symmetric
        if source.min() >= low and source.max() <= high:
            return low, high
    return int(info.min), int(info.max)


def rescaled(chain: Chain, axis: int, columns: np.ndarray, factors: np.ndarray, editor) -> gs.Tensor | None:
    """A copy of `chain` whose weight has indices `columns` along `axis` multiplied by `factors`,
    done exactly on the scale: a per-channel scale along `axis`, or a per-tensor one when every
    index gets the same factor. None where only requantizing could do it."""
    source = _constant(chain.source)  # its shape only: not decoded
    scheme = _scheme(chain, len(source.shape))
    if scheme is None:
        return None
    node, index = chain.nodes[scheme.scale[0]], scheme.scale[1]
    scale = constant_value(node.inputs[index]).copy()
    if scheme.axis == axis % len(source.shape):
        along = 0 if node.op == "DequantizeLinear" else scheme.axis - (len(source.shape) - scale.ndim)
        view = np.moveaxis(scale, along, 0)
        view[columns] *= factors.reshape((-1,) + (1,) * (view.ndim - 1)).astype(scale.dtype)
    elif scheme.axis is None and len(columns) == source.shape[axis] and np.all(factors == factors.reshape(-1)[0]):
        scale *= factors.reshape(-1)[0].astype(scale.dtype)
    else:
        return None
    current: gs.Tensor = chain.source
    for position, (chain_node, data) in enumerate(zip(chain.nodes, chain.data)):
        inputs = [current if i == data else editor.constant(t.name, scale) if (position, i) == scheme.scale else t
                  for i, t in enumerate(chain_node.inputs)]
        current = _copy(editor, chain_node, inputs)
    return current
