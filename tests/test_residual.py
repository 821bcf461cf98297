"""Residual-channel pruning: one group, the same channels removed everywhere."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import FORM_IDS, FORMS, feed_for, run
from onnxsnp import SnpError, prune
from onnxsnp.graph import ModelGraph
from onnxsnp.matching import find_blocks
from onnxsnp.residual import find_stream

VIT_FORMS = [(f, i) for f, i in zip(FORMS, FORM_IDS) if f[0] == "vit"]


@pytest.mark.parametrize("form", [f for f, _ in VIT_FORMS], ids=[i for _, i in VIT_FORMS])
def test_residual_pruning_is_consistent(exported, form):
    path = exported(*form)
    pruned, report = prune(str(path), ratio=0.0, residual=0.25, calib_samples=8)
    assert report.residual_width == [32, 24]
    g = ModelGraph(pruned)
    stream = find_stream(g, find_blocks(g))  # the pruned model is a consistent 24-wide stream
    assert stream.width == 24
    for node in pruned.graph.node:
        if node.op_type == "LayerNormalization":
            assert g.constant(node.input[1]).shape == (24,)
    batch = 3 if form[2] else 2
    outputs = run(pruned, feed_for(path, batch=batch))
    assert outputs[0].shape == (batch, 10) and np.isfinite(outputs[0]).all()


def test_residual_combines_with_everything(exported):
    path = exported("vit", "sdpa", True, "legacy")
    _, report = prune(str(path), ratio=0.5, heads=0.5, blocks=1, residual=0.25, align=2, calib_samples=8)
    assert report.residual_width == [32, 24] and len(report.removed_blocks) == 1
    assert report.flops_after < 0.5 * report.flops_before


def test_layernorm_correction_helps(exported):
    """The closed-form LayerNorm correction brings the pruned outputs closer to the original."""
    from onnxsnp.pipeline import prune_model, resolve_ratios

    path = exported("vit", "manual", True, "legacy")
    cosines = [prune_model(str(path), resolve_ratios(0.0, residual=0.25), calib_samples=32, compensate=flag,
                           residual_criterion="activation").report.fidelity.output_cosine for flag in (False, True)]
    assert cosines[1] > cosines[0]


def test_stream_that_is_a_model_output_is_refused(exported):
    with pytest.raises(SnpError, match="model output"):
        prune(str(exported("bert", "eager", True)), ratio=0.0, residual=0.25, calib_samples=8)


def test_unknown_reader_of_the_stream_stops_residual_pruning(exported, tmp_path):
    model = onnx.load(str(exported("vit", "manual", False)))
    stream_tensor = find_blocks(ModelGraph(onnx.load(str(exported("vit", "manual", False))))).layers[0].output
    model.graph.node.append(onnx.helper.make_node("ReduceMax", [stream_tensor], ["peak"], keepdims=0))
    model.graph.output.append(onnx.helper.make_tensor_value_info("peak", onnx.TensorProto.FLOAT, None))
    with pytest.raises(SnpError, match="ReduceMax"):
        prune(model, ratio=0.0, residual=0.25, calib_samples=8)
