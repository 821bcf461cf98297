"""Norms and scales: LayerNorm written out as arithmetic, RMS norms, LayerScale — a DINOv2-shaped
ViT is matched whole (no FFN listed as skipped) and its residual stream prunable (its blocks'
removal: tests/test_blocks.py)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphs
from conftest import feed_for, run
from exports import NORM_FORMS, form_ids
from onnxsnp import prune
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.score.importance import Ratios
from onnxsnp.match import find_blocks
from onnxsnp.match.norms import norm_reading, norm_writing
from onnxsnp.match.residual import find_stream
from onnxsnp.rewrite.rewriting import rewrite
from onnxsnp.match.blocks import Candidate
from oracle import masked_original, plan_for, unshare


def _norm_graph(kind: str) -> onnx.ModelProto:
    """x → norm → y with γ (and β for LayerNorm), as one op or written out."""
    b = graphs.Builder(opset=23 if kind == "op-rms" else 17)
    gamma = b.const(np.linspace(0.5, 1.5, graphs.WIDTH).astype(np.float32))
    beta = b.const(np.linspace(-0.1, 0.1, graphs.WIDTH).astype(np.float32))
    eps = b.const(np.array(1e-6, dtype=np.float32))
    if kind == "op-layer":
        y = b.op("LayerNormalization", ["x", gamma, beta], axis=-1)
    elif kind == "op-rms":
        y = b.op("RMSNormalization", ["x", gamma], axis=-1)
    elif kind == "op-simplified":  # onnxruntime's RMS norm, registered in the ONNX domain
        y = b.op("SimplifiedLayerNormalization", ["x", gamma], axis=-1)
    else:
        if kind == "layer":
            centred = b.op("Sub", ["x", b.op("ReduceMean", ["x"], axes=[-1])])
        else:
            centred = "x"
        square = b.op("Pow", [centred, b.const(np.array(2.0, dtype=np.float32))])
        rms = b.op("Sqrt", [b.op("Add", [b.op("ReduceMean", [square], axes=[-1]), eps])])
        y = b.op("Mul", [b.op("Div", [centred, rms]), gamma])
        if kind == "layer":
            y = b.op("Add", [y, beta])
    return b.model(y)


@pytest.mark.parametrize("kind", ["op-layer", "op-rms", "op-simplified", "layer", "rms"])
def test_norms_are_read_as_one_piece(kind):
    model = _norm_graph(kind)
    graphs.run(model, np.ones((1, graphs.TOKENS, graphs.WIDTH), np.float32))
    g = ModelGraph(model)
    (reader,) = [n for n in g.consumers_of("x")][:1]
    norm = norm_reading(g, "x", reader)
    output = next(n for n in model.graph.node if n.name == "output").input[0]
    assert norm is not None and norm.output == output and norm_writing(g, output) == norm
    assert len(norm.channel_inputs) == (2 if kind.endswith("layer") else 1)


@pytest.mark.slow
@pytest.mark.parametrize("family,attention,dynamic,exporter", NORM_FORMS, ids=form_ids(NORM_FORMS))
def test_dinov2_is_matched_whole_and_prunes_like_zeroing(exported, tmp_path, family, attention, dynamic, exporter):
    path = exported(family, attention, dynamic, exporter)
    matches = find_blocks(ModelGraph(onnx.load(str(path))))
    assert (len(matches.attention), len(matches.ffn), len(matches.layers), matches.skipped) == (2, 2, 2, ())
    unchanged, _ = prune(str(path), ratio=0.0, calib_samples=8)
    feed = feed_for(path, batch=2)
    for want, got in zip(run(path, feed), run(unchanged, feed)):
        assert np.abs(want - got).max() <= 1e-5
    g, plan = plan_for(unshare(path, tmp_path), Ratios(0.5, 0.25, 0.5, heads=0.5))
    for want, got in zip(run(masked_original(g, plan), feed), run(rewrite(g, plan), feed)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("family,attention,dynamic,exporter", NORM_FORMS, ids=form_ids(NORM_FORMS))
def test_dinov2_residual_stream_is_pruned(exported, family, attention, dynamic, exporter):
    path = exported(family, attention, dynamic, exporter)
    pruned, report = prune(str(path), ratio=0.0, residual=0.25, calib_samples=8)
    assert report.residual_width == [32, 24]
    g = ModelGraph(pruned)
    assert find_stream(g, find_blocks(g)).width == 24  # γ, β and both LayerScales followed the cut
    both, report = prune(str(path), ratio=0.5, residual=0.25, calib_samples=8)
    assert report.residual_width == [32, 24] and len(both.SerializeToString()) < 0.6 * path.stat().st_size
    for model in (pruned, both):
        outputs = run(model, feed_for(path, batch=2))
        assert outputs[0].shape == (2, 10) and np.isfinite(outputs[0]).all()


def test_inspect_says_why_a_block_is_not_removable():
    """A sub-block whose output is not added to a stream: the attention is pruned, and `inspect`
    says why it is no whole block."""
    model = graphs.softmax_attention()
    matches = find_blocks(ModelGraph(model))
    assert len(matches.attention) == 1 and not matches.layers
    (block,) = [s for s in matches.skipped if s.kind is Candidate.BLOCK]
    assert "not removable as a whole block" in block.reason and "residual Add" in block.reason
