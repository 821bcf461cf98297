"""The graph forms of the core issue: timm-style ViT and BERT from the legacy exporter."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import feed_for, run
from exports import FORM_IDS, FORMS
from onnxsnp import prune


@pytest.mark.parametrize("family,attention,dynamic,exporter", FORMS, ids=FORM_IDS)
def test_ratio_zero_is_identical(exported, family, attention, dynamic, exporter):
    path = exported(family, attention, dynamic, exporter)
    pruned, report = prune(str(path), ratio=0.0, calib_samples=8)
    feed = feed_for(path, batch=2)
    for want, got in zip(run(path, feed), run(pruned, feed)):
        assert np.abs(want - got).max() <= 1e-5
    assert report.params_after == report.params_before
    assert report.fidelity.max_abs_diff <= 1e-5


@pytest.mark.parametrize("family,attention,dynamic,exporter", FORMS, ids=FORM_IDS)
def test_half_ratio_halves_widths(exported, family, attention, dynamic, exporter):
    path = exported(family, attention, dynamic, exporter)
    pruned, report = prune(str(path), ratio=0.5, calib_samples=16)
    attention_rows = [b for b in report.blocks if b.kind == "attention"]
    ffn_rows = [b for b in report.blocks if b.kind == "ffn"]
    assert len(attention_rows) == 2 and len(ffn_rows) == 2
    for row in attention_rows:
        assert (row.heads, row.qk_dim_before, row.qk_dim_after, row.v_dim_after) == (4, 8, 4, 4)
    for row in ffn_rows:
        assert row.ffn_dim_after == row.ffn_dim_before // 2
    # attention and FFN projections dominate: their MACs halve, so the total falls clearly
    assert report.macs_after < 0.75 * report.macs_before
    assert report.params_after < report.params_before
    batches = (1, 3) if dynamic else (2,)
    for batch in batches:  # dynamic inputs must still run at other batch sizes (and sequence lengths)
        feed = feed_for(path, batch=batch, seq=5 if dynamic else 8)
        outputs = run(pruned, feed)
        reference = run(path, feed)
        assert [o.shape for o in outputs] == [r.shape for r in reference]
        assert all(np.isfinite(o).all() for o in outputs)
