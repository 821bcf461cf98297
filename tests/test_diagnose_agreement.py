"""tools/diagnose_agreement.py's margin table: shares and agreements per bin of the original's
top-1 margin, counted from the positions themselves."""
from __future__ import annotations

import numpy as np
import pytest

import diagnose_agreement

EDGES = (0.0, 1.0, 2.0, np.inf)


def test_each_bin_counts_its_own_positions():
    margins = np.array([0.5, 0.2, 1.5, 3.0, 5.0, 0.9])
    agree = np.array([False, True, False, True, True, False])
    kl = np.array([0.4, 0.2, 0.3, 0.1, 0.0, 0.6])
    rows = diagnose_agreement.margin_rows(margins, agree, kl, EDGES)
    low = [r for r in rows if r[0] == 0.0][0]  # 0.5, 0.2, 0.9: one of three agrees, two of the three misses
    assert low[2:] == pytest.approx((3 / 6, 1 / 3, 2 / 3, (0.4 + 0.2 + 0.6) / 3))
    assert sum(r[2] for r in rows) == pytest.approx(1.0) and sum(r[4] for r in rows) == pytest.approx(1.0)


def test_an_empty_bin_is_left_out():
    rows = diagnose_agreement.margin_rows(np.array([0.5, 3.0]), np.array([True, False]), np.zeros(2), EDGES)
    assert [r[0] for r in rows] == [0.0, 2.0]


def test_log_softmax_rows_are_log_probabilities():
    logits = np.random.default_rng(0).standard_normal((2, 3, 7)).astype(np.float32) * 10
    result = diagnose_agreement.log_softmax(logits)
    np.testing.assert_allclose(np.exp(result).sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(result[..., 1] - result[..., 0], logits[..., 1] - logits[..., 0], rtol=1e-5)
