"""Which quantized form a model is in, as `inspect` names it, and why a form cannot be pruned."""
from __future__ import annotations

from enum import Enum

import onnx
from onnx import numpy_helper

from ..errors import SnpError
from .qoperator import qdq_view


class QuantForm(str, Enum):
    FLOAT = "float"
    WEIGHT_ONLY = "weight-only int8 (integer weights behind DequantizeLinear or Cast → Mul)"
    STATIC_QDQ = "static QDQ (integer weights and biases behind DequantizeLinear, activation QuantizeLinear → " \
                 "DequantizeLinear pairs)"
    DYNAMIC = "dynamic int8 (DynamicQuantizeLinear → MatMulInteger)"
    QOPERATOR = "QOperator (QLinearMatMul and other QLinear ops)"
    NBITS = "block-quantized weights (com.microsoft.MatMulNBits)"


# ops of onnxruntime's QOperator format: their inputs and outputs are integers with scales of their own
_QOPERATOR_OPS = {"QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearConv", "QGemm", "QAttention",
                  "QLinearSoftmax", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearAveragePool",
                  "QLinearGlobalAveragePool", "QLinearReduceMean", "QLinearWhere", "QEmbedLayerNormalization"}


def quantized_form(model: onnx.ModelProto) -> tuple[QuantForm, str | None]:
    """(the form, how its weights are quantized: "per tensor", "per channel" or None)."""
    ops = {node.op_type for node in model.graph.node}
    sizes = {t.name: max(1, int(numpy_helper.to_array(t).size)) for t in model.graph.initializer if len(t.dims) <= 1}
    if ops & _QOPERATOR_OPS:
        # QLinearMatMul's weight scale is input 4 (QGemm's and QLinearConv's too)
        scales = [sizes.get(n.input[4], 1) for n in model.graph.node
                  if n.op_type in ("QLinearMatMul", "QGemm", "QLinearConv") and n.input[3] in _integer_matrices(model, 4)]
        return QuantForm.QOPERATOR, _granularity(scales)
    if "MatMulNBits" in ops:
        return QuantForm.NBITS, None
    if "MatMulInteger" in ops:
        scales = [sizes.get(n.input[3], 1) for n in model.graph.node if n.op_type == "MatMulInteger" and len(n.input) > 3]
        return QuantForm.DYNAMIC, _granularity(scales)
    weight_scales = [sizes.get(n.input[1], 1) for n in model.graph.node
                     if n.op_type == "DequantizeLinear" and n.input[0] in _integer_matrices(model)]
    if "QuantizeLinear" in ops and "DequantizeLinear" in ops:
        return QuantForm.STATIC_QDQ, _granularity(weight_scales)
    if weight_scales or "DequantizeLinear" in ops:
        return QuantForm.WEIGHT_ONLY, _granularity(weight_scales)
    return QuantForm.FLOAT, None


def unsupported(model: onnx.ModelProto) -> str | None:
    """Why a quantized form cannot be pruned at all, naming a node; None where it can be tried.
    A QOperator model is read as static QDQ (qoperator.py) where every QLinear op and every reader
    of its integer tensors is one that reading reproduces exactly."""
    if not {n.op_type for n in model.graph.node} & _QOPERATOR_OPS:
        return None
    try:
        qdq_view(model)
    except SnpError as reason:
        return str(reason)
    return None


def _integer_matrices(model: onnx.ModelProto, rank: int = 2) -> set[str]:
    """Integer initializers of rank 2 (up to `rank`: a convolution's weight has 4)."""
    return {t.name for t in model.graph.initializer if 2 <= len(t.dims) <= rank and
            t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}


def _granularity(scale_sizes: list[int]) -> str | None:
    if not scale_sizes:
        return None
    return "per channel" if any(size > 1 for size in scale_sizes) else "per tensor"
