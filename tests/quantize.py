"""Weight-only int8 versions of a float model, made at test time the two ways tools write them:
the weight as an integer initializer behind DequantizeLinear, or behind Cast → (Sub zero point)
→ Mul scale; per tensor (uint8 with a zero point) or per output channel (int8, symmetric)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxsnp.ir.graph import ModelGraph, attribute

STYLES = ("dq-tensor", "dq-channel", "cast-tensor", "cast-channel")


def _quantize(weight: np.ndarray, axis: int | None, unsigned: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(integers, scale, zero point); scale and zero point per tensor (axis None) or along `axis`."""
    others = tuple(a for a in range(weight.ndim) if a != axis) if axis is not None else None
    if unsigned:
        low = np.minimum(weight.min(axis=others, keepdims=True), 0)
        high = np.maximum(weight.max(axis=others, keepdims=True), 0)
        scale = (high - low) / 255
        zero = np.round(-low / scale)
        q = np.clip(np.round(weight / scale) + zero, 0, 255).astype(np.uint8)
        return q, scale.astype(np.float32), zero.astype(np.uint8)
    scale = np.abs(weight).max(axis=others, keepdims=True) / 127
    return np.clip(np.round(weight / scale), -127, 127).astype(np.int8), scale.astype(np.float32), \
        np.zeros(scale.shape, np.int8)


def quantize_weights(model: onnx.ModelProto, style: str) -> onnx.ModelProto:
    """Every MatMul/Gemm weight (a float 2-D initializer) quantized in `style` (STYLES)."""
    g = ModelGraph(model)
    kind, granularity = style.split("-")
    nodes = []
    for node in model.graph.node:
        source = g.initializer_behind(node.input[1]) if node.op_type in ("MatMul", "Gemm") else None
        weight = g.constant(node.input[1]) if source else None
        if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
            nodes.append(node)
            continue
        axis = 0 if node.op_type == "Gemm" and attribute(node, "transB", 0) else 1  # the output channels
        per_channel = granularity == "channel"
        q, scale, zero = _quantize(weight, axis if per_channel else None, unsigned=not per_channel)
        base = f"{node.name}/weight_q"
        model.graph.initializer.append(numpy_helper.from_array(q, base))
        dequantized = f"{base}/dequantized"
        if kind == "dq":
            model.graph.initializer.extend([numpy_helper.from_array(scale.reshape(-1) if per_channel else scale.reshape(()), f"{base}/scale"),
                                            numpy_helper.from_array(zero.reshape(-1) if per_channel else zero.reshape(()), f"{base}/zero")])
            nodes.append(helper.make_node("DequantizeLinear", [base, f"{base}/scale", f"{base}/zero"], [dequantized],
                                          name=f"{base}/DequantizeLinear", axis=axis))
        else:
            scale = scale if per_channel else scale.reshape(())
            model.graph.initializer.append(numpy_helper.from_array(scale, f"{base}/scale"))
            nodes.append(helper.make_node("Cast", [base], [f"{base}/float"], name=f"{base}/Cast", to=onnx.TensorProto.FLOAT))
            integers = f"{base}/float"
            if not per_channel:  # uint8 with a zero point: subtract it first
                model.graph.initializer.append(numpy_helper.from_array(zero.astype(np.float32).reshape(()), f"{base}/zero"))
                nodes.append(helper.make_node("Sub", [integers, f"{base}/zero"], [f"{base}/centred"], name=f"{base}/Sub"))
                integers = f"{base}/centred"
            nodes.append(helper.make_node("Mul", [integers, f"{base}/scale"], [dequantized], name=f"{base}/Mul"))
        node.input[1] = dequantized
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {t for n in model.graph.node for t in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if kind == "dq" and max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 13:
        raise ValueError("per-channel DequantizeLinear needs opset 13")
    return model


def calibration_reader(inputs: list[dict[str, np.ndarray]]):
    """onnxruntime's CalibrationDataReader over a list of feeds."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.left = iter(inputs)

        def get_next(self):
            return next(self.left, None)

    return Reader()


def quantize_static_qdq(source, target, inputs: list[dict[str, np.ndarray]], per_channel: bool,
                        op_types: list[str] | None = None):
    """onnxruntime's quantize_static in QDQ format with its defaults (uint8 activations, int8
    weights), per tensor or per channel, calibrated on `inputs`; `op_types`: only those ops
    quantized (["MatMul"]: a QDQ pair on each product's input, none after norms or Adds)."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    quantize_static(str(source), str(target), calibration_reader(inputs), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, op_types_to_quantize=op_types)
    return target


def quantize_dynamic_int8(source, target, per_channel: bool, reduce_range: bool = False):
    """onnxruntime's quantize_dynamic (int8 weights, DynamicQuantizeLinear → MatMulInteger)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), per_channel=per_channel, reduce_range=reduce_range,
                     weight_type=QuantType.QInt8)
    return target


def quantize_static_qoperator(source, target, inputs: list[dict[str, np.ndarray]], per_channel: bool):
    """onnxruntime's quantize_static in QOperator format (QLinearMatMul, QLinearAdd, … with
    QuantizeLinear / DequantizeLinear where integers meet float ops), its defaults otherwise."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    quantize_static(str(source), str(target), calibration_reader(inputs), quant_format=QuantFormat.QOperator,
                    per_channel=per_channel)
    return target
