"""Dynamically quantized models (onnxruntime's quantize_dynamic): each projection is
DynamicQuantizeLinear(x) → MatMulInteger(x_q, W_q, x_zero, w_zero) → Cast → Mul(x_scale·w_scale),
per tensor or per output channel. Pruned as x·(W_q − w_zero)·w_scale and written in that form:
the integer weight (and a per-channel scale and zero point) sliced, refitted ones quantized again."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from conftest import feed_for, run
from onnxsnp import prune
from onnxsnp.ir.dynamic import dynamic_view
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks

pytest.importorskip("onnxruntime.quantization")

RATIO = 0.5
HIDDEN, HEADS, FFN = 32, 4, 64  # tiny_bert's sizes (tools/torch_models.py), 2 layers
GOAL_MARGIN = 0.01  # the goal: cosine at most this far below pruning the float model, then quantizing
ERROR_RATIO = 1.5  # and, tighter, at most this times its error (measured ≈ 1; the same units are cut)
# (per_channel, reduce_range): reduce_range keeps onnxruntime's u8·s8 sums from saturating on
# AVX2-only CPUs, so the fidelity bounds are checked there; full-range weights are checked for form
SETTINGS = [(False, False), (True, False), (False, True), (True, True)]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module", params=SETTINGS, ids=lambda s: f"{'channel' if s[0] else 'tensor'}-{'7bit' if s[1] else '8bit'}")
def dynamic(request, exported, tmp_path_factory):
    """(float source, its dynamically quantized model, per_channel, reduce_range)."""
    from quantize import quantize_dynamic_int8

    source = exported("bert", "eager", True)
    per_channel, reduce_range = request.param
    target = tmp_path_factory.mktemp("dynamic") / "bert_dynamic.onnx"
    return source, quantize_dynamic_int8(source, target, per_channel, reduce_range), per_channel, reduce_range


def integer_layers(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Each MatMulInteger's (weight shape, w_scale shape), the scale read from its scales' Mul."""
    g = ModelGraph(model)
    layers = {}
    for node in model.graph.node:
        if node.op_type == "MatMulInteger":
            weight = g.initializers[g.initializer_behind(node.input[1])]
            assert weight.data_type == onnx.TensorProto.INT8
            output_mul = g.consumers_of(g.consumers_of(node.output[0])[0].output[0])[0]
            scales = next(g.producer_of(t) for t in output_mul.input if g.producer_of(t).op_type == "Mul")
            scale = next(g.constant(t) for t in scales.input if g.constant(t) is not None)
            layers[node.name] = (tuple(weight.dims), scale.shape)
    return layers


def test_read_as_dequantized_matmuls(dynamic):
    source, quantized, per_channel, _ = dynamic
    model = onnx.load(str(quantized))
    view = dynamic_view(model)
    assert view is not None and len(view.layers) == Counter(n.op_type for n in model.graph.node)["MatMulInteger"]
    # the view computes x·(W_q − w_zero)·w_scale in float: close to the float model (the weights'
    # rounding only), closer than the dynamic model that also rounds x
    feed = feed_for(source, batch=4)
    truth = run(str(source), feed)
    viewed = min(cosine(a, b) for a, b in zip(run(view.model, feed, optimize=False), truth))
    assert viewed >= min(cosine(a, b) for a, b in zip(run(str(quantized), feed), truth)) - 1e-4
    matches = find_blocks(ModelGraph(view.model))
    assert (len(matches.attention), len(matches.ffn), len(matches.layers)) == (2, 2, 2)
    assert not matches.skipped
    # ratio 0 writes the model back unchanged: the same ops, the same integer tensors
    back = view.requantize(view.model)
    assert Counter(n.op_type for n in back.graph.node) == Counter(n.op_type for n in model.graph.node)
    for want, got in zip(run(str(quantized), feed, optimize=False), run(back, feed, optimize=False)):
        assert np.abs(want - got).max() == 0


def test_pruned_stays_dynamic(dynamic):
    source, quantized, per_channel, _ = dynamic
    original = onnx.load(str(quantized))
    calib = feed_for(source, batch=16, seed=4)
    pruned, report = prune(str(quantized), ratio=RATIO, calib=calib)
    assert not report.skipped
    assert [b.qk_dim_after for b in report.blocks if b.kind == "attention"] == [round(HIDDEN // HEADS * (1 - RATIO))] * 2
    ops, before = Counter(n.op_type for n in pruned.graph.node), Counter(n.op_type for n in original.graph.node)
    for op in ("MatMulInteger", "DynamicQuantizeLinear", "MatMul", "DequantizeLinear"):  # nothing left dequantized
        assert ops[op] == before[op], op
    old, new = integer_layers(original), integer_layers(pruned)
    assert set(old) == set(new)
    kept_ffn = round(FFN * (1 - RATIO))
    fc1 = [new[n] for n in new if "intermediate" in n]
    assert [shape for shape, _ in fc1] == [(HIDDEN, kept_ffn)] * 2
    assert [scale for _, scale in fc1] == [(kept_ffn,) if per_channel else ()] * 2  # the scale sliced with its channels
    assert len([n for n in old if new[n] != old[n]]) == 2 * 6  # q, k, v, out, fc1, fc2 of both layers
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 for t in pruned.graph.initializer)
    onnx.checker.check_model(pruned)


def test_fidelity_is_that_of_pruning_then_quantizing(dynamic, tmp_path):
    from quantize import quantize_dynamic_int8

    source, quantized, per_channel, reduce_range = dynamic
    calib = feed_for(source, batch=16, seed=4)
    pruned, _ = prune(str(quantized), ratio=RATIO, calib=calib)
    float_pruned, _ = prune(str(source), ratio=RATIO, calib=calib)
    onnx.save(float_pruned, str(tmp_path / "pruned.onnx"))
    reference = quantize_dynamic_int8(tmp_path / "pruned.onnx", tmp_path / "pruned_int8.onnx", per_channel, reduce_range)
    feed = feed_for(source, batch=8, seed=99)
    truth = run(str(source), feed)
    ours = min(cosine(a, b) for a, b in zip(run(pruned, feed), truth))
    theirs = min(cosine(a, b) for a, b in zip(run(str(reference), feed), truth))
    assert ours >= theirs - GOAL_MARGIN, (ours, theirs)
    if reduce_range:  # exact integer arithmetic on every CPU: the tighter bound holds everywhere
        assert 1 - ours <= ERROR_RATIO * (1 - theirs) + 1e-6, (ours, theirs)
        # refitted weights quantized again stay in the 7-bit range
        g = ModelGraph(pruned)
        for node in pruned.graph.node:
            if node.op_type == "MatMulInteger":
                weight = g.constant(node.input[1])
                assert -64 <= weight.min() and weight.max() <= 64


def test_counted_like_the_float_model(dynamic):
    """MatMulInteger's int8 weights are parameters and its products MACs, as the float model's
    MatMuls are; a --target-flops budget is met on the dynamic model as on the float one."""
    source, quantized, _, _ = dynamic
    calib = feed_for(source, batch=16, seed=3)
    _, float_report = prune(str(source), ratio=0.0, calib=calib)
    _, report = prune(str(quantized), ratio=0.0, calib=calib)
    # the same weights, as int8, plus the float scales the quantizer added (named *_scale)
    scales = sum(int(np.prod(t.dims)) for t in onnx.load(str(quantized)).graph.initializer
                 if t.name.endswith("_scale") and t.data_type == onnx.TensorProto.FLOAT)
    assert report.params_before == float_report.params_before + scales
    assert report.flops_before == float_report.flops_before
    _, float_half = prune(str(source), target_flops=0.5, calib=calib)
    pruned, half = prune(str(quantized), target_flops=0.5, calib=calib)
    assert half.flops_before == float_half.flops_before
    assert half.flops_after <= 0.5 * half.flops_before * 1.01  # the budget, as the float model meets it
    assert half.params_after < half.params_before
    assert "MatMulInteger" in {n.op_type for n in pruned.graph.node}
