"""A pruned model must survive onnxruntime's transformers optimizer, the usual next step in a
deployment pipeline: the optimizer fuses attention assuming scale = 1/sqrt(head width), so
rewriting keeps the scores in that standard form for the pruned width (rewriting._standard_scale)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from conftest import feed_for, run
from onnxsnp import prune

optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")


def _peaked(source, path):
    """The tiny random BERT with its query weights ×6: its attention maps are then far from
    uniform, so that a wrong softmax scale shows in the outputs."""
    model = onnx.load(str(source))
    query_weights = {node.input[1] for node in model.graph.node if node.name.endswith("query/MatMul")}
    assert query_weights
    for tensor in model.graph.initializer:
        if tensor.name in query_weights:
            tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor) * 6, tensor.name))
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("ratio,qk_ratio", [(0.5, None), (0.25, 0.5)])
def test_pruned_bert_fuses_and_keeps_its_outputs(exported, tmp_path, ratio, qk_ratio):
    source = _peaked(exported("bert", "eager", True), tmp_path / "peaked.onnx")
    feed = feed_for(source, batch=2)
    pruned, report = prune(str(source), ratio=ratio, qk_ratio=qk_ratio, calib=feed_for(source, batch=16, seed=4),
                           calib_samples=16, compensate="none")
    path = tmp_path / "pruned.onnx"
    onnx.save(pruned, str(path))
    widths = {block.qk_dim_after for block in report.blocks if block.kind == "attention"}
    assert widths == {int(8 * (1 - (qk_ratio or ratio)))}  # 4 heads of 8 dims each, before pruning
    fused = optimizer.optimize_model(str(path), model_type="bert", num_heads=4, hidden_size=4 * widths.pop())
    ops = Counter(node.op_type for node in fused.model.graph.node)
    if qk_ratio is None:  # equal Q/K and V widths: onnxruntime's Attention fusion applies
        assert ops["Attention"] == 2
    for got, want in zip(run(fused.model, feed), run(pruned, feed)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
