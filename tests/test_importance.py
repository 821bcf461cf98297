"""The SNP criteria against brute-force definitions."""
from __future__ import annotations

import numpy as np
import pytest

from onnxsnp.score.criteria import redundancy
from onnxsnp.score.importance import _top_per_head, kept_count, qk_pair_scores


def brute_force_pair_scores(q: np.ndarray, k: np.ndarray, energy: float) -> np.ndarray:
    """ω_n = Σ_{j≤γ} |cos(u_j v_jᵀ, q_n k_nᵀ)| with the N×N SVD and flattened cosines, as in the paper."""
    scores = q @ k.T
    u, sigma, vt = np.linalg.svd(scores)
    share = np.cumsum(sigma**2) / (sigma**2).sum()
    gamma = int((share < energy - 1e-12).sum()) + 1  # rounding leaves Σ shares a hair under 1
    result = np.zeros(q.shape[1])
    for n in range(q.shape[1]):
        term = np.outer(q[:, n], k[:, n]).ravel()
        for j in range(gamma):
            component = np.outer(u[:, j], vt[j]).ravel()
            result[n] += abs(component @ term) / (np.linalg.norm(component) * np.linalg.norm(term))
    return result


@pytest.mark.parametrize("tokens,dim,energy", [(17, 8, 0.9), (5, 8, 0.9), (30, 4, 0.5), (12, 6, 1.0)])
def test_pair_scores_match_the_paper_definition(tokens, dim, energy):
    rng = np.random.default_rng(tokens * dim)
    q = rng.standard_normal((3, tokens, dim)) * rng.uniform(0.1, 3, dim)
    k = rng.standard_normal((3, tokens, dim)) + 0.5
    fast = qk_pair_scores(q, k, energy)
    for sample in range(3):
        np.testing.assert_allclose(fast[sample], brute_force_pair_scores(q[sample], k[sample], energy), rtol=1e-6,
                                   atol=1e-9)


def test_pair_that_carries_the_scores_scores_highest():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 20, 4)) * 0.01
    k = rng.standard_normal((1, 20, 4)) * 0.01
    q[0, :, 2] = rng.standard_normal(20) * 10  # pair 2 dominates Q·Kᵀ
    k[0, :, 2] = rng.standard_normal(20) * 10
    assert qk_pair_scores(q, k).argmax() == 2


def test_redundancy_flags_repeated_columns():
    rng = np.random.default_rng(1)
    columns = rng.standard_normal((16, 6))
    columns[:, 4] = 2 * columns[:, 1]  # a repeat of column 1
    scores = redundancy(columns)
    assert set(np.argsort(scores)[:2]) == {1, 4}


def test_same_count_kept_in_every_head():
    scores = np.random.default_rng(2).random((3, 8))
    kept = _top_per_head(scores, kept_count(8, 0.5))
    assert kept.shape == (3, 4)
    for head in range(3):
        assert set(kept[head]) == set(np.argsort(-scores[head])[:4])
        assert list(kept[head]) == sorted(kept[head])


@pytest.mark.parametrize("width,ratio,kept", [(8, 0.0, 8), (8, 0.5, 4), (8, 0.3, 6), (8, 0.99, 1), (64, 0.25, 48)])
def test_kept_count(width, ratio, kept):
    assert kept_count(width, ratio) == kept
