"""Residual-channel pruning: one group, the same channels removed everywhere."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import feed_for, run
from exports import FORM_IDS, FORMS
from onnxsnp import SnpError, prune
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.match import find_blocks
from onnxsnp.match.residual import find_stream

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
    from onnxsnp import prune

    path = exported("vit", "manual", True, "legacy")
    cosines = [prune(str(path), 0.0, residual=0.25, calib_samples=32, compensate=flag,
                     residual_criterion="activation")[1].fidelity.output_cosine for flag in (False, True)]
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


@pytest.mark.parametrize("attention,dynamic", [("eager", True), ("sdpa", False)])
def test_bert_classifier_stream_is_pruned(tmp_path, torch, attention, dynamic):
    """A BERT whose output is the pooled embedding: embedding tables, post-norm LayerNorms and the
    pooler are all part of the stream."""
    from torch_models import HFEncoder, export_legacy, tiny_bert

    model = HFEncoder(tiny_bert(attention, layers=2), ("pooler_output",))
    path = tmp_path / "bert_pooled.onnx"
    axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}, "pooler_output": {0: "b"}}
    export_legacy(model, (torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)), str(path),
                  ["input_ids", "attention_mask"], ["pooler_output"], axes if dynamic else None)
    pruned, report = prune(str(path), ratio=0.25, residual=0.25, calib_samples=16)
    assert report.residual_width == [32, 24]
    g = ModelGraph(pruned)
    assert find_stream(g, find_blocks(g)).width == 24
    tables = [g.constant(n.input[0]) for n in pruned.graph.node if n.op_type == "Gather" and g.is_constant(n.input[0])]
    assert tables and all(t.shape[-1] == 24 for t in tables if t.ndim == 2)
    outputs = run(pruned, feed_for(path, batch=3 if dynamic else 2, seq=5 if dynamic else 8))
    assert outputs[0].shape[-1] == 32  # the pooler writes its own 32 features, not the stream
