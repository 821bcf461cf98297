"""Weight-only int8 models (DequantizeLinear or Cast → Mul, per tensor or per channel): scored on
their dequantized values, cut in their integer form, and written still quantized."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import feed_for, run
from exports import INT8_FORMS, form_ids
from onnxsnp import prune
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.score.importance import Ratios
from onnxsnp.match import find_blocks
from onnxsnp.rewrite.rewriting import rewrite
from oracle import masked_original, plan_for



@pytest.mark.parametrize("style", ["dq-tensor", "dq-channel", "cast-tensor", "cast-channel"])
def test_new_values_are_quantized_again_with_the_same_scheme(style):
    """A refit's weights go back into the integer tensor with the same type, granularity and kind
    of zero point; what the graph then computes is within half a quantization step of them."""
    import onnx_graphsurgeon as gs

    import graphs
    from onnxsnp.rewrite.editor import Editor
    from quantize import quantize_weights

    model = quantize_weights(graphs.softmax_attention(), style)
    g = ModelGraph(model)
    graph = gs.import_onnx(model)
    editor = Editor(g, graph)
    matmul = next(n for n in graph.nodes if n.op == "MatMul" and g.is_constant(n.inputs[1].name))

    def chain():  # (integers, scale and zero point values) behind the weight
        nodes = [matmul.inputs[1].inputs[0]]
        while not isinstance(nodes[-1].inputs[0], gs.Constant):
            nodes.append(nodes[-1].inputs[0].inputs[0])
        return nodes[-1].inputs[0].values, [t.values for n in nodes for t in n.inputs[1:] if isinstance(t, gs.Constant)]

    old_integers, old_parameters = chain()
    target = np.random.default_rng(0).standard_normal(editor.current(matmul, 1).shape).astype(np.float32)
    editor.write(matmul, 1, target)
    integers, parameters = chain()
    assert integers.dtype == old_integers.dtype and integers.dtype in (np.int8, np.uint8)
    assert [(p.shape, p.dtype) for p in parameters] == [(p.shape, p.dtype) for p in old_parameters]
    assert [bool(np.any(p)) for p in parameters if p.dtype != np.float32] == \
        [bool(np.any(p)) for p in old_parameters if p.dtype != np.float32]  # a zero point only where there was one
    step = max(p.max() for p in parameters if p.dtype == np.float32)
    assert np.abs(editor.current(matmul, 1) - target).max() <= step / 2 + 1e-6


def integer_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.data_type in (2, 3))


@pytest.mark.slow
@pytest.mark.parametrize("family,attention,dynamic,exporter", INT8_FORMS, ids=form_ids(INT8_FORMS))
def test_quantized_weights_are_found(exported, family, attention, dynamic, exporter):
    matches = find_blocks(ModelGraph(onnx.load(str(exported(family, attention, dynamic, exporter)))))
    assert (len(matches.attention), len(matches.ffn), len(matches.layers)) == (2, 2, 2)
    assert not matches.skipped


@pytest.mark.slow
@pytest.mark.parametrize("family,attention,dynamic,exporter", INT8_FORMS, ids=form_ids(INT8_FORMS))
def test_ratio_zero_is_identical_and_half_stays_quantized(exported, family, attention, dynamic, exporter):
    path = exported(family, attention, dynamic, exporter)
    original = onnx.load(str(path))
    unchanged, _ = prune(str(path), ratio=0.0, calib_samples=8)
    feed = feed_for(path, batch=2)
    for want, got in zip(run(path, feed), run(unchanged, feed)):
        assert np.abs(want - got).max() <= 1e-5
    pruned, report = prune(str(path), ratio=0.5, calib_samples=16)
    assert [b.qk_dim_after for b in report.blocks if b.kind == "attention"] == [4, 4]
    assert report.params_after < 0.75 * report.params_before
    # the projections are still read from integers: the integer bytes shrink, no float weight appears
    assert 0.3 * integer_bytes(original) < integer_bytes(pruned) < 0.75 * integer_bytes(original)
    assert len(pruned.SerializeToString()) < len(original.SerializeToString())
    g = ModelGraph(pruned)
    weights = [n.input[1] for n in pruned.graph.node if n.op_type in ("MatMul", "Gemm") and g.is_constant(n.input[1])]
    assert weights and all(g.initializer_behind(w) is None for w in weights)  # each computed from integers


@pytest.mark.slow
@pytest.mark.parametrize("family,attention,dynamic,exporter", INT8_FORMS, ids=form_ids(INT8_FORMS))
def test_pruned_equals_masked_original(exported, family, attention, dynamic, exporter):
    path = exported(family, attention, dynamic, exporter)
    g, plan = plan_for(path, Ratios(0.5, 0.25, 0.5, heads=0.5))
    pruned = rewrite(g, plan)
    feed = feed_for(path, batch=3, seq=5)
    # unoptimized: onnxruntime turns DequantizeLinear → MatMul into MatMulNBits, which rounds the activations
    for want, got in zip(run(masked_original(g, plan), feed, optimize=False), run(pruned, feed, optimize=False)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-3)


def _written(style: str, values: np.ndarray | None = None, gram: np.ndarray | None = None, rows: int = 0):
    """(the weight the graph computes, its integers, its scale and zero point values) after
    `values` (default: random) is written into the first MatMul weight of a `style` int8 graph."""
    import onnx_graphsurgeon as gs

    import graphs
    from onnxsnp.rewrite.editor import Editor
    from quantize import quantize_weights

    model = quantize_weights(graphs.softmax_attention(), style)
    g = ModelGraph(model)
    graph = gs.import_onnx(model)
    editor = Editor(g, graph)
    matmul = next(n for n in graph.nodes if n.op == "MatMul" and g.is_constant(n.inputs[1].name))
    if values is None:
        return editor.current(matmul, 1).shape
    editor.write(matmul, 1, values, gram, rows)
    nodes = [matmul.inputs[1].inputs[0]]
    while not isinstance(nodes[-1].inputs[0], gs.Constant):
        nodes.append(nodes[-1].inputs[0].inputs[0])
    parameters = [t.values for n in nodes for t in n.inputs[1:] if isinstance(t, gs.Constant)]
    return editor.current(matmul, 1), nodes[-1].inputs[0].values, parameters


@pytest.mark.parametrize("rows", [0, 1])
@pytest.mark.parametrize("style", ["dq-tensor", "dq-channel", "cast-tensor", "cast-channel"])
def test_a_refitted_int8_weight_with_its_gram_keeps_its_outputs_closer(style, rows):
    """A refit's weights written with the Gram of the inputs along `rows`: the same scale and zero
    point as rounding to nearest (the scheme is the range's), round-to-nearest's levels where H ∝ I
    (no row's error has anywhere to go), and on correlated inputs outputs X·W closer to the float
    ones than rounding to nearest gives."""
    shape = _written(style)
    rng = np.random.default_rng(6)
    target = rng.standard_normal(shape).astype(np.float32)
    width = shape[rows]
    # inputs sharing a few strong directions (as a transformer's hidden units do): rounding errors
    # of different rows add up in X·W, and error feedback has something to cancel
    inputs = rng.standard_normal((512, 3)) @ rng.standard_normal((3, width)) * 3 + 0.3 * rng.standard_normal((512, width))
    nearest, nearest_integers, nearest_parameters = _written(style, target)
    _, same_integers, same_parameters = _written(style, target, 5.0 * np.eye(width), rows)
    fed, _, fed_parameters = _written(style, target, inputs.T @ inputs, rows)
    np.testing.assert_array_equal(same_integers, nearest_integers)
    for got, want in zip(fed_parameters + same_parameters, nearest_parameters * 2):
        np.testing.assert_array_equal(got, want)

    def output_error(weight):  # ‖X·ΔW‖ with X reading axis `rows` of the weight
        return np.linalg.norm(inputs @ np.moveaxis(weight - target, rows, 0).reshape(width, -1))

    assert output_error(fed) < 0.8 * output_error(nearest)


def _float_arrays(held) -> list[np.ndarray]:
    """Every float array an editor's recipe (rewrite/known.py) holds, however deep."""
    from dataclasses import fields, is_dataclass

    if isinstance(held, np.ndarray):
        return [held] if np.issubdtype(held.dtype, np.floating) else []
    if is_dataclass(held):
        return [a for f in fields(held) for a in _float_arrays(getattr(held, f.name))]
    return []


@pytest.mark.parametrize("style", ["dq-tensor", "dq-channel", "cast-tensor", "cast-channel"])
def test_an_edited_int8_weight_is_held_in_its_integer_form(style, monkeypatch):
    """The editor reads a quantized weight's shape and dtype, and slices it, without decoding it to
    float; what it holds of the weights it wrote (sliced, quantized again, rescaled) is their
    integers and per-channel parameters, not float copies; and reading them back gives the float
    values of the edits themselves, bit for bit."""
    import onnx_graphsurgeon as gs

    import graphs
    from onnxsnp.rewrite.editor import Editor
    from quantize import quantize_weights

    model = quantize_weights(graphs.softmax_attention(), style)
    g = ModelGraph(model)
    editor = Editor(g, gs.import_onnx(model))
    matmuls = [n for n in editor.graph.nodes if n.op == "MatMul" and g.is_constant(n.inputs[1].name)]
    first, second = matmuls[0], matmuls[1]
    weight, other = g.constant(first.inputs[1].name).copy(), g.constant(second.inputs[1].name).copy()
    g.forget_constants()
    decode = editor.value
    monkeypatch.setattr(editor, "value", lambda tensor: pytest.fail(f"{tensor} decoded to float"))
    assert editor.shape(first, 1) == weight.shape and editor.dtype(first, 1) == weight.dtype
    keep = np.arange(0, weight.shape[1], 2)
    editor.take(first, 1, keep, 1)
    factors = np.linspace(0.5, 2.0, len(keep)).astype(np.float32)
    # exact on a per-channel scale; per tensor these factors are not, and nothing changes
    exact = editor.scale_along(first, 1, np.arange(len(keep)), factors, 1, exact_only=True)
    assert exact == style.endswith("channel")
    assert editor.shape(first, 1) == (weight.shape[0], len(keep)) and editor.dtype(first, 1) == weight.dtype
    assert not g._constants, "a weight decoded for its shape, dtype or slice"
    monkeypatch.setattr(editor, "value", decode)
    target = np.random.default_rng(1).standard_normal(other.shape).astype(np.float32)
    editor.write(second, 1, target)
    held = [a for known in editor.known.values() for a in _float_arrays(known)]
    # per-tensor or per-channel parameters and factors only: nothing of a weight's two dimensions
    assert held and all(a.size == max(a.shape, default=1) for a in held), "float copies of the edited weights held"
    sliced = np.take(weight, keep, 1)
    rescaled = sliced.copy()
    rescaled[:, :] *= factors.reshape(1, -1)
    np.testing.assert_array_equal(editor.current(first, 1), rescaled if exact else sliced)
    assert np.abs(editor.current(second, 1) - target).max() <= np.abs(target).max() / 64  # quantized again
