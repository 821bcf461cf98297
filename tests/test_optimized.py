"""Graphs saved by onnxruntime's session optimizer (basic, extended, all): Gemm between flattening
Reshapes, Transposes moved after the q/k/v Split, FusedMatMul with the scale in alpha, contrib
activations and SkipLayerNormalization. Each is pruned like its unoptimized export."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import feed_for, run
from exports import SESSION_FORMS, form_ids
from onnxsnp import SnpError, prune
from onnxsnp.score.importance import Ratios
from onnxsnp.rewrite.rewriting import rewrite
from onnxsnp.match.blocks import Candidate
from oracle import masked_original, plan_for, unshare

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family,attention,dynamic,exporter", SESSION_FORMS, ids=form_ids(SESSION_FORMS))
def test_ratio_zero_is_identical(exported, family, attention, dynamic, exporter):
    path = exported(family, attention, dynamic, exporter)
    pruned, report = prune(str(path), ratio=0.0, calib_samples=8)
    feed = feed_for(path, batch=2)
    for want, got in zip(run(path, feed), run(pruned, feed)):
        assert np.abs(want - got).max() <= 1e-5
    assert report.params_after == report.params_before


@pytest.mark.parametrize("family,attention,dynamic,exporter", SESSION_FORMS, ids=form_ids(SESSION_FORMS))
def test_half_ratio_prunes_every_block_and_shrinks_the_file(exported, family, attention, dynamic, exporter):
    path = exported(family, attention, dynamic, exporter)
    pruned, report = prune(str(path), ratio=0.5, calib_samples=16)
    assert not [s for s in report.skipped if s.kind is not Candidate.BLOCK], report.skipped
    assert [(b.heads, b.qk_dim_after, b.v_dim_after) for b in report.blocks if b.kind == "attention"] == [(4, 4, 4)] * 2
    assert [b.ffn_dim_after * 2 == b.ffn_dim_before for b in report.blocks if b.kind == "ffn"] == [True] * 2
    assert len(pruned.SerializeToString()) < path.stat().st_size and report.params_after < 0.75 * report.params_before
    for batch in (1, 3) if dynamic else (2,):
        feed = feed_for(path, batch=batch, seq=5 if dynamic else 8)
        assert [o.shape for o in run(pruned, feed)] == [r.shape for r in run(path, feed)]


@pytest.mark.parametrize("heads", [0.0, 0.5])
@pytest.mark.parametrize("family,attention,dynamic,exporter", SESSION_FORMS, ids=form_ids(SESSION_FORMS))
def test_pruned_equals_masked_original(exported, tmp_path, family, attention, dynamic, exporter, heads):
    path = unshare(exported(family, attention, dynamic, exporter), tmp_path)
    g, plan = plan_for(path, Ratios(0.5, 0.25, 0.5, heads=heads))
    assert [len(k.heads) for k in plan.attention] == [4 - int(4 * heads)] * 2
    pruned = rewrite(g, plan)
    feed = feed_for(path, batch=3 if dynamic else 2, seq=5 if dynamic else 8)
    for want, got in zip(run(masked_original(g, plan), feed, optimize=False), run(pruned, feed, optimize=False)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-3)


@pytest.mark.parametrize("family,attention,dynamic,exporter", SESSION_FORMS, ids=form_ids(SESSION_FORMS))
def test_blocks_and_residual_where_the_form_allows(exported, family, attention, dynamic, exporter):
    """A whole block comes out of every form; the residual stream of the ViTs is cut except at
    "all", whose patch Conv is onnxruntime's NCHWc kernel (BERT's stream is a model output)."""
    path = exported(family, attention, dynamic, exporter)
    feed = feed_for(path, batch=2)
    if family == "vit" and not dynamic and exporter != "ort-session-basic":
        # the last block's join is a SkipLayerNormalization that writes no sum: one block left
        with pytest.raises(SnpError, match="at least one must stay"):
            prune(str(path), ratio=0.25, blocks=1, calib_samples=8)
    else:
        pruned, report = prune(str(path), ratio=0.25, blocks=1, calib_samples=8)
        assert len(report.removed_blocks) == 1
        assert [o.shape for o in run(pruned, feed)] == [o.shape for o in run(path, feed)]
    if family == "bert" or exporter.endswith("all"):
        with pytest.raises(SnpError, match="model output" if family == "bert" else "patch Conv"):
            prune(str(path), ratio=0.0, residual=0.25, calib_samples=8)
        return
    pruned, report = prune(str(path), ratio=0.25, residual=0.25, calib_samples=8)
    assert report.residual_width == [32, 24]
    assert np.isfinite(run(pruned, feed)[0]).all()
