"""Static QDQ models (onnxruntime's quantize_static, QuantFormat.QDQ): int8 weights and biases
behind DequantizeLinear and a QuantizeLinear → DequantizeLinear pair after every activation.
They are pruned in that form: the integer tensors are sliced (refitted ones quantized again with
their scheme) and every activation pair stays, its one scale valid for a narrower tensor."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import feed_for, run
from onnxsnp import prune
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks
from onnxsnp.match.blocks import Candidate

pytest.importorskip("onnxruntime.quantization")

RATIO = 0.5
HIDDEN, HEADS, FFN = 32, 4, 64  # tiny_bert's sizes (tools/torch_models.py), 2 layers
# The pruned int8 model is at most this much (cosine to the float original) below pruning the
# float model and then quantizing it the same way: the goal.
GOAL_MARGIN = 0.01
ERROR_RATIO = 1.5  # measured ≈ 1.0 (both prune the same units; only the rounding differs)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def calibration(source) -> list[dict[str, np.ndarray]]:
    return [feed_for(source, batch=4, seed=10 + i) for i in range(4)]


def joined(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}


@pytest.fixture(scope="module", params=[False, True], ids=["per-tensor", "per-channel"])
def qdq(request, exported, tmp_path_factory):
    """(float source, its static QDQ model, per_channel)."""
    from quantize import quantize_static_qdq

    source = exported("bert", "eager", True)
    target = tmp_path_factory.mktemp("qdq") / f"bert_qdq_{request.param}.onnx"
    return source, quantize_static_qdq(source, target, calibration(source), request.param), request.param


def activation_pairs(model: onnx.ModelProto) -> set[str]:
    """The names of the QuantizeLinear nodes on run-time tensors, each followed by its DequantizeLinear."""
    g = ModelGraph(model)
    return {n.name for n in model.graph.node if n.op_type == "QuantizeLinear" and not g.is_constant(n.input[0])
            and [r.op_type for r in g.consumers_of(n.output[0])] == ["DequantizeLinear"]}


def integer_weights(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Each constant-weight MatMul's integer tensor shape, read through its DequantizeLinear."""
    g = ModelGraph(model)
    shapes = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and g.is_constant(node.input[1]):
            dequantize = g.producer_of(node.input[1])
            assert dequantize is not None and dequantize.op_type == "DequantizeLinear", node.name
            source = g.initializer_behind(dequantize.input[0])
            assert source is not None and g.initializers[source].data_type == onnx.TensorProto.INT8
            shapes[node.name] = tuple(g.initializers[source].dims)
    return shapes


def test_matched_like_the_float_model(qdq):
    source, quantized, _ = qdq
    want = find_blocks(ModelGraph(onnx.load(str(source))))
    got = find_blocks(ModelGraph(onnx.load(str(quantized))))
    assert (len(got.attention), len(got.ffn)) == (len(want.attention), len(want.ffn)) == (2, 2)
    assert [b.head_dim for b in got.attention] == [HIDDEN // HEADS] * 2
    assert not [s for s in got.skipped if s.kind is not Candidate.BLOCK]
    # the projections' biases are found behind their activation QDQ pairs, as int8 behind DequantizeLinear
    g = ModelGraph(onnx.load(str(quantized)))
    for block in got.attention:
        for linear in (block.q, block.k, block.v, block.out):
            assert linear.bias is not None and g.producer_of(linear.bias).op_type == "DequantizeLinear"


def test_pruned_stays_static_qdq(qdq, tmp_path):
    source, quantized, per_channel = qdq
    original = onnx.load(str(quantized))
    pruned, report = prune(str(quantized), ratio=RATIO, calib=joined(calibration(source)))
    assert not [s for s in report.skipped if s.kind is not Candidate.BLOCK]
    head_dim = HIDDEN // HEADS
    assert [b.qk_dim_after for b in report.blocks if b.kind == "attention"] == [round(head_dim * (1 - RATIO))] * 2
    # the same quantized form: every activation pair back, every weight still int8 behind
    # DequantizeLinear (a QDQ-rounded constant that pruning recomputes, the attention's scale, is
    # written as the float constant it stands for)
    assert activation_pairs(pruned) == activation_pairs(original)
    old, new = integer_weights(original), integer_weights(pruned)
    assert set(old) == set(new)
    shrunk = {name for name in old if new[name] != old[name]}
    assert len(shrunk) == 2 * 6  # q, k, v, out, fc1, fc2 of both layers
    kept_ffn = round(FFN * (1 - RATIO))
    assert sorted(new[n] for n in shrunk if "intermediate" in n) == [(HIDDEN, kept_ffn)] * 2
    assert sorted(new[n] for n in shrunk if "output/dense" in n and "attention" not in n) == [(kept_ffn, HIDDEN)] * 2
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 for t in pruned.graph.initializer)
    if per_channel:  # a per-channel scale was sliced with its channels
        g = ModelGraph(pruned)
        for node in pruned.graph.node:
            if node.op_type == "MatMul" and node.name in shrunk and "intermediate" in node.name:
                assert g.constant(g.producer_of(node.input[1]).input[1]).shape == (kept_ffn,)
    onnx.checker.check_model(pruned)


def test_ratio_zero_is_identical(qdq):
    source, quantized, _ = qdq
    unchanged, _ = prune(str(quantized), ratio=0.0, calib=joined(calibration(source)))
    feed = feed_for(source, batch=2)
    for want, got in zip(run(str(quantized), feed, optimize=False), run(unchanged, feed, optimize=False)):
        assert np.abs(want - got).max() <= 1e-5


def test_fidelity_is_that_of_pruning_then_quantizing(qdq, tmp_path):
    """Against the float original, the pruned int8 model is within GOAL_MARGIN (cosine) of the
    float model pruned the same way and then quantized the same way. Run without graph
    optimizations, DequantizeLinear → MatMul computes in float, so the numbers are those of the
    QDQ arithmetic on every CPU; the optimized run (int8 kernels, which differ between CPUs) only
    has to stay as close to it as the quantized original stays to its own unoptimized run."""
    from quantize import quantize_static_qdq

    source, quantized, per_channel = qdq
    calib = joined(calibration(source))
    pruned, _ = prune(str(quantized), ratio=RATIO, calib=calib)
    pruned_path = tmp_path / "pruned_qdq.onnx"
    onnx.save(pruned, str(pruned_path))
    float_pruned, _ = prune(str(source), ratio=RATIO, calib=calib)
    onnx.save(float_pruned, str(tmp_path / "pruned.onnx"))
    reference = quantize_static_qdq(tmp_path / "pruned.onnx", tmp_path / "pruned_then_qdq.onnx",
                                    calibration(source), per_channel)
    feed = feed_for(source, batch=8, seed=99)
    truth = run(str(source), feed)
    ours = min(cosine(a, b) for a, b in zip(run(str(pruned_path), feed, optimize=False), truth))
    theirs = min(cosine(a, b) for a, b in zip(run(str(reference), feed, optimize=False), truth))
    assert ours >= theirs - GOAL_MARGIN, (ours, theirs)
    # and tighter, since these tiny models sit near cosine 1: no more than ERROR_RATIO times the error
    assert 1 - ours <= ERROR_RATIO * (1 - theirs) + 1e-6, (ours, theirs)
    # onnxruntime's int8 kernels: the pruned model moves from its QDQ arithmetic no more than
    # 4× as far as the quantized original does from its own (plus float round-off)
    drift = max(1 - cosine(a, b) for a, b in zip(run(str(pruned_path), feed), run(str(pruned_path), feed, optimize=False)))
    baseline = max(1 - cosine(a, b) for a, b in zip(run(str(quantized), feed), run(str(quantized), feed, optimize=False)))
    assert drift <= 4 * baseline + 1e-4, (drift, baseline)


def test_activation_ranges_are_those_of_one_run_over_every_sample(qdq, monkeypatch):
    """The ranges are measured one sample a run (RANGE_BATCH: every activation is fetched at once,
    4 GB at 8 windows of a 30-layer decoder); a min and a max over the samples, they are those of
    one run over all of them, up to float rounding."""
    from onnxsnp.data import activation_ranges
    from onnxsnp.data.activation_ranges import _activation_pairs, _ranges

    _, quantized, _ = qdq
    model, calib = onnx.load(str(quantized)), joined(calibration(qdq[0]))
    tensors = sorted({tensor for tensor, _, _ in _activation_pairs(model).values()})
    samples = next(iter(calib.values())).shape[0]
    one_at_a_time = _ranges(model, tensors, calib, samples, "model")
    monkeypatch.setattr(activation_ranges, "RANGE_BATCH", samples)
    all_at_once = _ranges(model, tensors, calib, samples, "model")
    assert activation_ranges.RANGE_BATCH == samples > 1 and len(tensors) > 0
    for tensor in tensors:
        np.testing.assert_allclose(one_at_a_time[tensor], all_at_once[tensor], rtol=1e-5, atol=1e-6, err_msg=tensor)


def test_activation_ranges_follow_the_pruned_model(qdq):
    """Pruning moves activations (projected Q/K carry what the cut dimensions carried): each pair
    is calibrated again, its range set where the quantizer set it relative to the float range it
    saw (MinMax: on it), now the pruned model's — up to the 2 % a range may move and keep its
    pair (activation_ranges.MOVED) and half a step of rounding the zero point. An asymmetric pair
    keeps its zero point: its one scale covers both ends and meets one of them."""
    from onnxsnp.data.activation_ranges import MOVED, _activation_pairs, _ranges
    from onnxsnp.pipeline import _split

    source, quantized, _ = qdq
    calib = joined(calibration(source))
    pruned, _ = prune(str(quantized), ratio=RATIO, calib=calib)
    calib = _split(calib, None)[0]  # ranges are calibrated on the fitted samples (the held-back ones judge)
    original = onnx.load(str(quantized))
    ranges = {}
    for model in (original, pruned):
        pairs = _activation_pairs(model)
        seen = _ranges(model, sorted({tensor for tensor, _, _ in pairs.values()}), calib, 16, "model")
        g = ModelGraph(model)
        for name, (tensor, scale_name, zero_name) in pairs.items():
            scale, zero = float(g.constant(scale_name)), int(g.constant(zero_name))
            info = np.iinfo(g.constant(zero_name).dtype)
            ranges.setdefault(name, []).append(((info.min - zero) * scale, (info.max - zero) * scale, *seen[tensor], scale))
    # pairs that share parameters (a Reshape's output and its input's) are one range: their union
    shared: dict[str, list[str]] = {}
    for name, (_, scale_name, _) in _activation_pairs(pruned).items():
        shared.setdefault(scale_name, []).append(name)
    for names in shared.values():
        union = [(r[0], r[1], min(ranges[n][i][2] for n in names), max(ranges[n][i][3] for n in names), r[4])
                 for i, r in enumerate(ranges[names[0]])]
        ranges.update({n: union for n in names})
    moved = 0
    for name, ((low0, high0, a0, b0, step0), (low1, high1, a1, b1, step)) in ranges.items():
        if max(abs(a1 - a0), abs(b1 - b0)) <= MOVED * (b0 - a0):
            continue
        moved += 1
        if abs(low0 + high0 + step0) <= 1e-2 * step0:  # a symmetric pair (signed, zero point 0) scales as a whole
            reach = max(-a1, b1) / max(-a0, b0)
            want_low, want_high = low0 * reach, high0 * reach
            assert abs(low1 - want_low) <= step and abs(high1 - want_high) <= step, \
                (name, (low1, high1), (want_low, want_high), (low0, high0, a0, b0, a1, b1))
        else:  # each end where it was relative to the float range (an end at zero stays at zero)
            want_low = low0 * a1 / a0 if a0 < 0 else low1
            want_high = high0 * b1 / b0 if b0 > 0 else high1
            if 0 < round(-low0 / step0) < round((high0 - low0) / step0):  # a zero point inside the levels is kept
                assert round(-low0 / step0) == round(-low1 / step)
            assert low1 <= want_low + step and high1 >= want_high - step, (name, (low1, high1), (want_low, want_high))
            assert min(abs(low1 - want_low), abs(high1 - want_high)) <= step, (name, (low1, high1), (want_low, want_high))
    assert moved  # some ranges did move
