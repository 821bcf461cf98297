"""The pruned model composes with the usual next steps of a deployment pipeline: onnxruntime's
dynamic int8 quantization, and its transformers optimizer followed by quantization."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from conftest import feed_for, run
from onnxsnp import prune

quantization = pytest.importorskip("onnxruntime.quantization")
optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")

# Quantization hurts the pruned model at most this many times as much (1 - cosine to its own float
# outputs) as it hurts the original, measured on the same machine with the same kernels; the floor
# covers float round-off where the original's error is ~0.
ERROR_GROWTH, ERROR_FLOOR = 4, 1e-5
QUANTIZED_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "QEmbedLayerNormalization"}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def quantize(source, target, optimized: bool = False):
    # reduce_range: 7-bit weights, so no u8·s8 pair sum (at most 2·255·64) saturates int16 in the
    # AVX2 / AVX-512BW kernels (vpmaddubsw); onnxruntime then computes the same integers on every
    # x86-64 CPU, with or without VNNI, and the bounds below hold wherever the suite runs.
    # The optimizer's com.microsoft ops defeat the quantizer's ONNX shape inference; it then needs
    # to be told that untyped tensors are float (true for these models).
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT} if optimized else {}
    quantization.quantize_dynamic(str(source), str(target), weight_type=quantization.QuantType.QInt8,
                                  reduce_range=True, extra_options=extra)
    return target


def quantization_error(quantized, reference, feed) -> float:
    """The largest 1 - cosine between a quantized model's outputs and its float reference's."""
    return max(1 - cosine(q, f) for q, f in zip(run(str(quantized), feed), run(str(reference), feed)))


def pruned_model(exported, tmp_path, family: str):
    source = exported(family, "manual" if family == "vit" else "eager", True)
    pruned, report = prune(str(source), ratio=0.5, calib=feed_for(source, batch=16, seed=4), calib_samples=16)
    path = tmp_path / "pruned.onnx"
    onnx.save(pruned, str(path))
    return source, path, report


@pytest.mark.parametrize("family", ["vit", "bert"])
def test_prune_then_quantize(exported, tmp_path, family):
    source, pruned, _ = pruned_model(exported, tmp_path, family)
    feed = feed_for(source, batch=4)
    both = quantize(pruned, tmp_path / "pruned_int8.onnx")
    alone = quantize(source, tmp_path / "int8.onnx")
    ops = Counter(node.op_type for node in onnx.load(str(both)).graph.node)
    assert ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"] > 0
    assert both.stat().st_size < alone.stat().st_size < source.stat().st_size
    # quantization hurts the pruned model no more than it hurts the original
    baseline = quantization_error(alone, source, feed)
    assert quantization_error(both, pruned, feed) < ERROR_GROWTH * baseline + ERROR_FLOOR


def test_prune_then_optimize_then_quantize(exported, tmp_path):
    source, pruned, report = pruned_model(exported, tmp_path, "bert")
    feed = feed_for(source, batch=4)
    attention = [b for b in report.blocks if b.kind == "attention"]
    heads, width = attention[0].heads_after, attention[0].qk_dim_after
    # the optimizer must be told the pruned attention width: heads × kept Q/K width per head
    fused = optimizer.optimize_model(str(pruned), model_type="bert", num_heads=heads, hidden_size=heads * width)
    assert Counter(n.op_type for n in fused.model.graph.node)["Attention"] == len(attention)
    optimized = tmp_path / "pruned_opt.onnx"
    fused.save_model_to_file(str(optimized))
    final = quantize(optimized, tmp_path / "pruned_opt_int8.onnx", optimized=True)
    ops = Counter(node.op_type for node in onnx.load(str(final)).graph.node)
    assert ops["QAttention"] == len(attention) and not ops["Attention"]
    assert QUANTIZED_OPS & set(ops)
    # the baseline: the original through the same optimizer and quantizer, on this machine
    reference = optimizer.optimize_model(str(source), model_type="bert", num_heads=attention[0].heads,
                                         hidden_size=attention[0].heads * attention[0].qk_dim_before)
    reference.save_model_to_file(str(tmp_path / "opt.onnx"))
    baseline = quantization_error(quantize(tmp_path / "opt.onnx", tmp_path / "opt_int8.onnx", optimized=True),
                                  source, feed)
    assert quantization_error(final, pruned, feed) < ERROR_GROWTH * baseline + ERROR_FLOOR
