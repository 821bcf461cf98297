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

# int8 weights with per-tensor dynamic activations: the quantized model's outputs stay this close
# (cosine) to the float model's, for the original as for the pruned one
INT8_COSINE = 0.999
QUANTIZED_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "QEmbedLayerNormalization"}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def quantize(source, target, optimized: bool = False):
    # the optimizer's com.microsoft ops defeat the quantizer's ONNX shape inference; it then needs
    # to be told that untyped tensors are float (true for these models)
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT} if optimized else {}
    quantization.quantize_dynamic(str(source), str(target), weight_type=quantization.QuantType.QInt8,
                                  extra_options=extra)
    return target


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
    for got, want in zip(run(str(both), feed), run(str(pruned), feed)):
        assert cosine(got, want) > INT8_COSINE
    # quantization hurts the pruned model no more than it hurts the original
    for (q, original), (pq, p) in zip(zip(run(str(alone), feed), run(str(source), feed)),
                                      zip(run(str(both), feed), run(str(pruned), feed))):
        assert 1 - cosine(pq, p) < 4 * (1 - cosine(q, original)) + 1e-5


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
    for got, want in zip(run(str(final), feed), run(str(pruned), feed)):
        assert cosine(got, want) > INT8_COSINE
