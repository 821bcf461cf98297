"""optimum-onnx exports (from a local folder) of BERT, RoBERTa, DistilBERT, a ViT classifier and
CLIP (text and vision towers in one graph), and `optimum-cli onnxruntime optimize` at -O1 … -O4
(com.microsoft Attention, SkipLayerNormalization, BiasGelu/FastGelu, fp16 at -O4). Made at test
time in a venv of their own (tools/optimum_venv.py)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import feed_for, run
from exports import OPTIMUM_FORMS, form_ids
from onnxsnp import SnpError, prune
from onnxsnp.ir.graph import ModelGraph
from onnxsnp.score.importance import Ratios
from onnxsnp.match import find_blocks
from onnxsnp.rewrite.rewriting import rewrite
from onnxsnp.match.blocks import Candidate
from oracle import masked_original, plan_for, unshare, zeroed_blocks

pytestmark = pytest.mark.slow
TOWERS = {"clip": 2}  # attention blocks: 2 layers per tower


def prune_with_feed(path, **options):
    # CLIP's logits are (image batch, text batch): onnxsnp's calibration cannot join such outputs
    # over batches of different sizes yet, so it gets one batch (8 samples)
    samples = 8 if "clip" in path.parent.parent.name else 16
    return prune(str(path), calib=feed_for(path, batch=samples, seed=5), calib_samples=samples, **options)


@pytest.mark.parametrize("family,attention,dynamic,exporter", OPTIMUM_FORMS, ids=form_ids(OPTIMUM_FORMS))
def test_every_block_is_found_and_ratio_zero_is_identical(exported, family, attention, dynamic, exporter):
    path = exported(family, attention, dynamic, exporter)
    matches = find_blocks(ModelGraph(onnx.load(str(path))))
    blocks = 2 * TOWERS.get(family, 1)
    assert (len(matches.attention), len(matches.ffn)) == (blocks, blocks)
    assert not [s for s in matches.skipped if s.kind is not Candidate.BLOCK], matches.skipped
    unchanged, report = prune_with_feed(path, ratio=0.0)
    feed = feed_for(path, batch=2)
    for want, got in zip(run(path, feed), run(unchanged, feed)):
        assert np.abs(want - got).max() <= (2e-2 if exporter.endswith("O4") else 1e-5)
    assert report.params_after == report.params_before


@pytest.mark.parametrize("family,attention,dynamic,exporter", OPTIMUM_FORMS, ids=form_ids(OPTIMUM_FORMS))
def test_pruned_equals_masked_original(exported, tmp_path, family, attention, dynamic, exporter):
    path = unshare(exported(family, attention, dynamic, exporter), tmp_path)
    g, plan = plan_for(path, Ratios(0.5, 0.25, 0.5, heads=0.5))
    assert [len(k.heads) for k in plan.attention] == [2] * len(plan.attention), \
        [k.block.heads_fixed for k in plan.attention]
    feed = feed_for(path, batch=3, seq=5)
    tolerance = 2e-2 if exporter.endswith("O4") else 2e-5  # -O4 writes fp16 weights
    for want, got in zip(run(masked_original(g, plan), feed, optimize=False), run(rewrite(g, plan), feed, optimize=False)):
        np.testing.assert_allclose(got, want, atol=tolerance, rtol=100 * tolerance)


@pytest.mark.parametrize("family,attention,dynamic,exporter", OPTIMUM_FORMS, ids=form_ids(OPTIMUM_FORMS))
def test_half_ratio_blocks_and_residual(exported, family, attention, dynamic, exporter):
    path = exported(family, attention, dynamic, exporter)
    feed = feed_for(path, batch=3, seq=5)
    pruned, report = prune_with_feed(path, ratio=0.5)
    assert [b.qk_dim_after for b in report.blocks if b.kind == "attention"] == [4] * 2 * TOWERS.get(family, 1)
    assert len(pruned.SerializeToString()) < path.stat().st_size
    assert [o.shape for o in run(pruned, feed)] == [o.shape for o in run(path, feed)]
    layers = find_blocks(ModelGraph(onnx.load(str(path)))).layers
    if len(layers) > 1:  # a whole block out (where a block's stream exists as a tensor: see inspect)
        pruned, report = prune_with_feed(path, ratio=0.0, blocks=1)
        assert len(report.removed_blocks) == 1 and np.isfinite(run(pruned, feed)[0]).all()
    if family in ("bert", "roberta", "distilbert"):  # last_hidden_state is the stream itself (-O4: cast to fp32)
        with pytest.raises(SnpError, match="model output|Cast node graph_output_cast0 reads the residual stream"):
            prune_with_feed(path, ratio=0.0, residual=0.25)
    elif family == "vit":
        pruned, report = prune_with_feed(path, ratio=0.0, residual=0.25)
        assert report.residual_width == [32, 24] and np.isfinite(run(pruned, feed)[0]).all()


PRE_NORM = [form for form in OPTIMUM_FORMS if form[0] in ("vit", "clip")]


@pytest.mark.parametrize("family,attention,dynamic,exporter", PRE_NORM, ids=form_ids(PRE_NORM))
def test_removing_a_block_equals_zeroing_what_it_adds(exported, family, attention, dynamic, exporter):
    """Every removable pre-norm block, one at a time: the rewrite (a bypass, and where the block's
    last join is a SkipLayerNormalization, the next norm recomputed from its input) equals the
    original with the block's contributions zeroed."""
    path = exported(family, attention, dynamic, exporter)
    layers = find_blocks(ModelGraph(onnx.load(str(path)))).layers
    feed = feed_for(path, batch=2)
    for index in range(len(layers) if len(layers) > 1 else 0):
        g, plan = plan_for(path, Ratios(0.0, 0.0, 0.0, block_indices=(index,)))
        assert [layer.name for layer in plan.removed_layers] == [layers[index].name]
        tolerance = 2e-2 if exporter.endswith("O4") else 2e-5
        for want, got in zip(run(zeroed_blocks(g, plan.removed_layers), feed, optimize=False),
                             run(rewrite(g, plan), feed, optimize=False)):
            np.testing.assert_allclose(got, want, atol=tolerance, rtol=100 * tolerance)
